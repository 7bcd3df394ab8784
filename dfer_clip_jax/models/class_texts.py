"""Class texts for the prompts: names, our own facial-behaviour descriptions, manual templates.

DFER-CLIP's best setting replaces each class name by a *descriptor*: a short list of the visible
facial cues of the expression. The paper's descriptors were written by a language model; the
descriptions below are our own, written for this project in the same spirit (what the mouth,
cheeks, eyes, brows, forehead and nose do). To use any other texts (for instance the paper's),
put them in a file and point the config's `class_texts_file` at it (`load_class_texts`).

Text types (`DFERCLIPConfig.text_type`), as in the reference's prompt strings:
  class_name          "happiness."
  name_with_context   "an expression of happiness."
  descriptor          DESCRIPTIONS["happiness"]
  template            `template.format(name)`, e.g. the paper's manual prompts (Table 3)
                      "a photo of happiness." or "an expression of happiness."
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence

TEXT_TYPES = ("class_name", "name_with_context", "descriptor", "template")

# Our descriptions (not the paper's), one per class of the 11-class (MAFW) order; the 7-class
# datasets use the first seven. Each fits the 77-token context with 16 context tokens.
DESCRIPTIONS: dict[str, str] = {
  "happiness": (
    "happiness: mouth corners pulled up and back into a smile, cheeks lifted, crinkles at "
    "the outer eye corners, lower eyelids pushed up, teeth often visible."
  ),
  "sadness": (
    "sadness: inner ends of the eyebrows drawn upward, drooping upper eyelids, mouth corners "
    "turned down, chin raised and wrinkled, gaze cast down."
  ),
  "neutral": (
    "neutral: a relaxed face with level eyebrows, eyes normally open, lips closed and at "
    "rest, smooth forehead and cheeks, no muscle tension."
  ),
  "anger": (
    "anger: eyebrows lowered and pulled together, vertical furrows between the brows, a hard "
    "stare, lips pressed tight or bared, flared nostrils."
  ),
  "surprise": (
    "surprise: eyebrows raised high and arched, long lines across the forehead, eyes wide "
    "open with white above the iris, jaw dropped, mouth open."
  ),
  "disgust": (
    "disgust: nose wrinkled, upper lip raised, cheeks pushed up, lower eyelids narrowed, "
    "eyebrows lowered, head pulled back from something."
  ),
  "fear": (
    "fear: eyebrows raised and drawn together, upper eyelids lifted, tense lower eyelids, "
    "lips stretched sideways, mouth slightly open, eyes fixed."
  ),
  "contempt": (
    "contempt: one mouth corner tightened and raised on one side only, a lopsided smirk, "
    "slightly narrowed eyes, chin lifted, looking down the nose."
  ),
  "anxiety": (
    "anxiety: worried brows pinched upward, a tense forehead, eyes darting or blinking "
    "often, lips pressed or bitten, a tight jaw."
  ),
  "helplessness": (
    "helplessness: inner brows raised, heavy eyelids, eyes looking away or upward, slack "
    "lips with the mouth slightly open, a face without energy."
  ),
  "disappointment": (
    "disappointment: brows sinking at the outer ends, lips pressed together with the corners "
    "pulled down, gaze dropping, cheeks flat and still."
  ),
}

# The paper's hand-written prompts (its Table 3); `{}` is replaced by the class name.
MANUAL_TEMPLATES: dict[str, str] = {
  "photo": "a photo of {}.",
  "expression": "an expression of {}.",
}


def class_texts(
  class_names: Sequence[str], text_type: str, template: str | None = None
) -> list[str]:
  """The text of each class for `text_type` (see the module docstring)."""
  if text_type not in TEXT_TYPES:
    raise ValueError(f"unknown text_type {text_type!r}: expected one of {TEXT_TYPES}")
  if text_type == "template":
    if not template or "{}" not in template:
      raise ValueError(
        f"text_type 'template' needs a template containing '{{}}', got "
        f"{template!r} (e.g. {MANUAL_TEMPLATES['photo']!r})"
      )
    return [template.format(name) for name in class_names]
  if text_type == "class_name":
    return [f"{name}." for name in class_names]
  if text_type == "name_with_context":
    return [f"an expression of {name}." for name in class_names]
  unknown = [name for name in class_names if name not in DESCRIPTIONS]
  if unknown:
    raise ValueError(
      f"no built-in description for classes {unknown}: put descriptions in a "
      "file and set class_texts_file"
    )
  return [DESCRIPTIONS[name] for name in class_names]


def _joined(value, where: str) -> str:
  """A text, or a list of cue phrases joined with ', ' and closed with '.'."""
  if isinstance(value, str):
    text = value.strip()
  elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    text = ", ".join(v.strip().rstrip(".") for v in value) + "."
  else:
    raise ValueError(
      f"{where}: expected a string or a non-empty list of strings, got {type(value).__name__}"
    )
  if not text:
    raise ValueError(f"{where}: empty text")
  return text


def load_class_texts(path: str | os.PathLike, class_names: Sequence[str]) -> list[str]:
  """Reads one text per class from a user file, in the order of `class_names`.

  Formats:
    `.json`: a list with one entry per class (label order), or an object mapping every class
      name to its entry; an entry is a string or a list of cue phrases (joined with ", ").
    anything else: plain UTF-8 text, one class text per line in label order; blank lines and
      lines starting with '#' are skipped.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"class texts file {path} does not exist")
  n = len(class_names)
  if path.suffix.lower() == ".json":
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if isinstance(data, list):
      if len(data) != n:
        raise ValueError(
          f"{path}: holds {len(data)} class texts, expected {n} (one per class, "
          f"in label order: {', '.join(class_names)})"
        )
      return [_joined(v, f"{path}: entry {i} ({class_names[i]})") for i, v in enumerate(data)]
    if isinstance(data, Mapping):
      missing = [c for c in class_names if c not in data]
      extra = [k for k in data if k not in class_names]
      if missing or extra:
        raise ValueError(
          f"{path}: class names do not match the dataset's {n} classes: missing "
          f"{missing}, unexpected {extra}"
        )
      return [_joined(data[c], f"{path}: entry {c!r}") for c in class_names]
    raise ValueError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
  texts, lines = [], []
  for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    line = line.strip()
    if line and not line.startswith("#"):
      texts.append(line)
      lines.append(lineno)
  if len(texts) != n:
    raise ValueError(
      f"{path}: holds {len(texts)} class texts (non-blank lines {lines[:12]}"
      f"{' ...' if len(lines) > 12 else ''}), expected {n}: one line per class in "
      f"label order ({', '.join(class_names)})"
    )
  return texts
