"""Fonts and text measures shared by every plot the project draws (confusion matrices,
prediction timelines, annotated videos)."""

from __future__ import annotations

from PIL import ImageFont


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """Pillow's default font at `size` pixels (shared by every plot the project draws)."""
  # Pillow's bundled scalable font needs FreeType; the bitmap fallback is small but legible.
  try:
    return ImageFont.load_default(size=size)
  except (ImportError, OSError, TypeError):
    return ImageFont.load_default()


def text_size(font, text: str) -> tuple[int, int]:
  """(width, height) of `text` drawn in `font`."""
  left, top, right, bottom = font.getbbox(text)
  return right - left, bottom - top
