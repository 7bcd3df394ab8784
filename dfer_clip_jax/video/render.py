"""Pictures of a prediction, drawn with PIL only: the timeline plot and the annotated video."""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# One PIL text helper for all our plots (confusion matrix, timelines).
from dfer_clip_jax.plotting import load_font, text_size

# Distinct colours for up to 11 classes (the MAFW label set), then repeated.
PALETTE = (
  (31, 119, 180),
  (214, 39, 40),
  (127, 127, 127),
  (255, 127, 14),
  (44, 160, 44),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (188, 189, 34),
  (23, 190, 207),
  (0, 0, 0),
)


def class_colour(k: int) -> tuple[int, int, int]:
  return PALETTE[k % len(PALETTE)]


@dataclasses.dataclass
class Series:
  """One track's timeline: per window its interval and probabilities (None = no face there)."""

  title: str
  starts: np.ndarray  # (N,) s
  ends: np.ndarray  # (N,) s
  probs: list[np.ndarray | None]  # N x (C,)


def _tick_step(duration: float, target: int = 8) -> float:
  raw = max(duration, 1e-9) / target
  base = 10 ** math.floor(math.log10(raw))
  for m in (1, 2, 5, 10):
    if m * base >= raw:
      return m * base
  return 10 * base


def render_timeline(
  series: Sequence[Series],
  class_names: Sequence[str],
  duration_s: float,
  *,
  title: str = "",
  width: int = 1000,
  panel_height: int = 260,
) -> Image.Image:
  """Probability of each class over time, one panel per track.

  Each window's probabilities are plotted at the window's centre and joined by lines (broken
  where a window has no face); a one-window input shows flat lines over its interval. The strip
  above each panel is coloured by the top class of the window nearest in time.
  """
  font, small, big = load_font(14), load_font(12), load_font(16)
  pad, left, legend_w = 10, 48, 170
  title_h = text_size(big, title or "Ag")[1] + 2 * pad
  strip_h, axis_h = 10, 40
  right = width - legend_w
  height = title_h + len(series) * (panel_height + pad)
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  draw.text((pad, pad), title, fill="black", font=big)
  duration_s = max(duration_s, 1e-6)

  # Legend once, beside the first panel.
  for k, name in enumerate(class_names):
    y = title_h + k * 18
    draw.line([right + 15, y + 8, right + 40, y + 8], fill=class_colour(k), width=3)
    draw.text((right + 46, y), name, fill="black", font=small)

  for p, s in enumerate(series):
    y0 = title_h + p * (panel_height + pad)
    ptop = y0 + text_size(font, "Ag")[1] + pad + strip_h + 4
    pbottom = y0 + panel_height - axis_h
    draw.text((left, y0), s.title, fill="black", font=font)

    def x_of(t: float) -> float:
      return left + (right - 10 - left) * t / duration_s

    def y_of(v: float) -> float:
      return pbottom - (pbottom - ptop) * v

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
      y = y_of(v)
      draw.line([left, y, right - 10, y], fill=(225, 225, 225))
      label = f"{v:.2f}"
      draw.text((left - 6 - text_size(small, label)[0], y - 7), label, fill="black", font=small)
    step = _tick_step(duration_s)
    t = 0.0
    while t <= duration_s + 1e-9:
      x = x_of(t)
      draw.line([x, pbottom, x, pbottom + 4], fill="black")
      label = f"{t:g}"
      draw.text((x - text_size(small, label)[0] / 2, pbottom + 6), label, fill="black", font=small)
      t += step
    draw.text(
      ((left + right - 10 - text_size(small, "time (s)")[0]) / 2, pbottom + 22),
      "time (s)",
      fill="black",
      font=small,
    )
    draw.rectangle([left, ptop, right - 10, pbottom], outline="black")

    valid = [i for i, pr in enumerate(s.probs) if pr is not None]
    centres = (s.starts + s.ends) / 2.0
    # Top-class strip: each window owns the time nearest to its centre (within its interval).
    strip_y = ptop - strip_h - 3
    for i in valid:
      lo = s.starts[i] if i == 0 else max(s.starts[i], (centres[i - 1] + centres[i]) / 2)
      hi = s.ends[i] if i == len(centres) - 1 else min(s.ends[i], (centres[i] + centres[i + 1]) / 2)
      k = int(np.argmax(s.probs[i]))
      draw.rectangle([x_of(lo), strip_y, x_of(hi), strip_y + strip_h], fill=class_colour(k))
    if len(valid) == 1:
      i = valid[0]
      for k, v in enumerate(s.probs[i]):
        draw.line(
          [x_of(s.starts[i]), y_of(v), x_of(s.ends[i]), y_of(v)], fill=class_colour(k), width=2
        )
    for k in range(len(class_names)):
      run: list[tuple[float, float]] = []
      for i in range(len(s.probs)):
        if s.probs[i] is None:
          _draw_run(draw, run, class_colour(k))
          run = []
          continue
        run.append((x_of(centres[i]), y_of(float(s.probs[i][k]))))
      _draw_run(draw, run, class_colour(k))
  return img


def _draw_run(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour) -> None:
  if len(points) >= 2:
    draw.line(points, fill=colour, width=2)
  for x, y in points:
    draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)


@dataclasses.dataclass
class Overlay:
  """What to draw on one frame: a box (or None) and a label."""

  box: Sequence[float] | None
  label: str
  colour: tuple[int, int, int]


def draw_overlays(rgb: np.ndarray, overlays: Iterable[Overlay]) -> np.ndarray:
  """The frame with each overlay's box and label drawn (labels without a box go top-left)."""
  im = Image.fromarray(rgb, "RGB")
  draw = ImageDraw.Draw(im)
  h, w = rgb.shape[:2]
  font = load_font(max(12, min(h, w) // 24))
  line = max(2, min(h, w) // 200)
  corner_y = 4
  for ov in overlays:
    tw, th = text_size(font, ov.label)
    if ov.box is not None:
      x0, y0, x1, y1 = (float(v) for v in ov.box)
      draw.rectangle([x0, y0, x1, y1], outline=ov.colour, width=line)
      tx, ty = x0, y0 - th - 6 if y0 - th - 6 >= 0 else y1 + 2
    else:
      tx, ty = 4, corner_y
      corner_y += th + 8
    if ov.label:
      draw.rectangle([tx, ty, tx + tw + 6, ty + th + 6], fill=ov.colour)
      draw.text((tx + 3, ty + 1), ov.label, fill="white", font=font)
  return np.asarray(im)


def write_video(path: str | os.PathLike, frames: Iterable[tuple[float, np.ndarray]]) -> int:
  """Encodes (time s, RGB frame) pairs to an MP4 (H.264 when FFmpeg has it, else MPEG-4).

  Frames keep their times (millisecond time base), so variable frame rates play as they were;
  odd widths / heights lose their last pixel row or column (4:2:0 needs even sizes).
  Returns the number of frames written.
  """
  import av  # pylint: disable=g-import-not-at-top

  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  container = av.open(str(path), "w")
  stream, count, last_pts = None, 0, -1
  try:
    for t, rgb in frames:
      if stream is None:
        h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
        if h == 0 or w == 0:
          raise ValueError(
            f"frames of {rgb.shape[1]}x{rgb.shape[0]} pixels are too small to encode"
          )
        stream = container.add_stream(codec, rate=1000)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        if codec == "libx264":
          stream.options = {"crf": "20", "preset": "veryfast"}
        else:
          stream.bit_rate = 4_000_000
      if rgb.shape[:2] != (h, w):
        # Cropped to even sizes, or a stream whose resolution changes midway: fit the first's.
        rgb = (
          rgb[:h, :w]
          if rgb.shape[0] - h in (0, 1) and rgb.shape[1] - w in (0, 1)
          else np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        )
      frame = _video_frame(rgb)
      # Strictly increasing pts: two frames within a millisecond would be rejected by the muxer.
      last_pts = max(int(round(t * 1000)), last_pts + 1)
      frame.pts = last_pts
      for packet in stream.encode(frame):
        container.mux(packet)
      count += 1
    if stream is not None:
      for packet in stream.encode():
        container.mux(packet)
  finally:
    container.close()
  return count


def _video_frame(rgb: np.ndarray):
  import av  # pylint: disable=g-import-not-at-top

  return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")


def summary_label(class_names: Sequence[str], probs: np.ndarray | None) -> str:
  if probs is None:
    return "no face"
  k = int(np.argmax(probs))
  return f"{class_names[k]} {100 * float(probs[k]):.0f}%"


def frames_with_overlays(
  frames: Iterable[tuple[float, np.ndarray]], overlays_at: Callable[[float], list[Overlay]]
) -> Iterable[tuple[float, np.ndarray]]:
  for t, rgb in frames:
    yield t, draw_overlays(rgb, overlays_at(t))
