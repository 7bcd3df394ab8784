"""Annotation lists in the reference format and the frame-folder clip source.

An annotation list holds one clip per line, `<frame_dir> <num_frames> <label>`, separated
by spaces, no header, label 0-based (docs/method.md, Data). Relative frame folders are joined with
a data root, so the reference's lists (absolute paths on the authors' machine) can be
rewritten once with relative paths and used anywhere.

A clip's frames are the image files of its folder sorted by name as strings, as the
reference's `glob(dir/*)` + `sort()` gives them (hidden files excluded, like glob does).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

# Extensions counted as frames (compared lower-cased). Other files in a frame folder are
# ignored by `list_frames` and reported by `validate`.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# How many line errors an AnnotationError message spells out before summarising.
_MAX_LISTED_ERRORS = 20


class LineError(NamedTuple):
  """One problem found on one line of an annotation list."""

  line: int
  kind: str  # 'malformed_line' | 'bad_count' | 'bad_label' | 'duplicate_clip'
  message: str


class AnnotationError(ValueError):
  """An annotation list is malformed; names the file, the lines and what was expected."""

  def __init__(self, file: str | os.PathLike[str], errors: Sequence[LineError]):
    self.file = pathlib.Path(file)
    self.errors = list(errors)
    self.line = self.errors[0].line if self.errors else None
    shown = [f"{self.file}:{e.line}: {e.message}" for e in self.errors[:_MAX_LISTED_ERRORS]]
    if len(self.errors) > _MAX_LISTED_ERRORS:
      shown.append(f"... and {len(self.errors) - _MAX_LISTED_ERRORS} more problems")
    super().__init__("\n".join(shown))


@dataclasses.dataclass(frozen=True)
class ClipAnnotation:
  """One line of an annotation list.

  Attributes:
    frame_dir: the clip's frame folder (joined with the data root when relative).
    num_frames: the frame count the list gives (the reference samples with it).
    label: the class id.
    line_no: 1-based line number in `source`.
    source: the annotation file.
    clip_id: the folder as written in the list (defaults to `str(frame_dir)`).
  """

  frame_dir: pathlib.Path
  num_frames: int
  label: int
  line_no: int
  source: pathlib.Path
  clip_id: str = ""

  def __post_init__(self):
    if not self.clip_id:
      object.__setattr__(self, "clip_id", str(self.frame_dir))

  @property
  def origin(self) -> str:
    """`file:line` of this clip, for error messages."""
    return f"{self.source}:{self.line_no}"


def _parse_int(text: str) -> int | None:
  # int() also accepts '+3', ' 3' and '3_0'; the format only has plain decimal digits.
  if text.isascii() and (text.isdigit() or (text[:1] == "-" and text[1:].isdigit())):
    return int(text)
  return None


def scan_annotations(
  path: str | os.PathLike[str],
  *,
  data_root: str | os.PathLike[str] | None = None,
  num_classes: int | None = None,
) -> tuple[list[ClipAnnotation], list[LineError]]:
  """Parses an annotation list, collecting every bad line instead of stopping at the first.

  Args:
    path: the annotation list.
    data_root: folder that relative frame folders are joined with; when None, relative
      folders are taken relative to the annotation file's folder.
    num_classes: when given, labels must lie in [0, num_classes).

  Returns:
    `(annotations, errors)`: the well-formed lines (a duplicate's later occurrences
    excluded) and one `LineError` per bad line, in file order.
  """
  path = pathlib.Path(path)
  root = pathlib.Path(data_root) if data_root is not None else path.parent
  annotations: list[ClipAnnotation] = []
  errors: list[LineError] = []
  first_line_of: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, raw in enumerate(f, start=1):
      text = raw.strip()
      if not text:
        continue  # A trailing empty line is common and harmless.
      fields = text.split()
      if len(fields) != 3:
        errors.append(
          LineError(
            line_no,
            "malformed_line",
            f'expected 3 fields "<frame_dir> <num_frames> <label>", got {len(fields)}: {text!r}',
          )
        )
        continue
      folder, count_text, label_text = fields
      num_frames, label = _parse_int(count_text), _parse_int(label_text)
      if num_frames is None or label is None:
        which = "num_frames" if num_frames is None else "label"
        bad = count_text if num_frames is None else label_text
        errors.append(
          LineError(
            line_no, "malformed_line", f"{which} must be an integer, got {bad!r} in {text!r}"
          )
        )
        continue
      if num_frames < 1:
        errors.append(
          LineError(
            line_no,
            "bad_count",
            f"num_frames must be a positive integer (a clip needs at least one frame), "
            f"got {num_frames}",
          )
        )
        continue
      if label < 0 or (num_classes is not None and label >= num_classes):
        expected = f"in [0, {num_classes - 1}]" if num_classes is not None else "non-negative"
        errors.append(LineError(line_no, "bad_label", f"label must be {expected}, got {label}"))
        continue
      frame_dir = root / folder
      key = os.path.normpath(frame_dir)
      if key in first_line_of:
        errors.append(
          LineError(
            line_no,
            "duplicate_clip",
            f"clip {folder} is listed again (first on line {first_line_of[key]})",
          )
        )
        continue
      first_line_of[key] = line_no
      annotations.append(
        ClipAnnotation(
          frame_dir=frame_dir,
          num_frames=num_frames,
          label=label,
          line_no=line_no,
          source=path,
          clip_id=folder,
        )
      )
  return annotations, errors


def read_annotations(
  path: str | os.PathLike[str],
  *,
  data_root: str | os.PathLike[str] | None = None,
  num_classes: int | None = None,
) -> list[ClipAnnotation]:
  """Reads an annotation list in the reference format.

  Args:
    path: the annotation list (`<frame_dir> <num_frames> <label>` per line).
    data_root: folder that relative frame folders are joined with; absolute folders that
      don't exist (the reference lists hold the authors' paths) are re-rooted under it
      (`rebase_absolute`); when None, relative folders are taken relative to the annotation
      file's folder.
    num_classes: when given, labels must lie in [0, num_classes).

  Returns:
    One `ClipAnnotation` per line, in file order.

  Raises:
    AnnotationError: listing every malformed line (field count, non-integer or
      non-positive frame count, label out of range, duplicate clip) as `file:line`.
    FileNotFoundError: the list does not exist.
  """
  annotations, errors = scan_annotations(path, data_root=data_root, num_classes=num_classes)
  if errors:
    raise AnnotationError(path, errors)
  if not annotations:
    raise AnnotationError(path, [LineError(1, "malformed_line", "the list holds no clips")])
  if data_root is not None:
    annotations = rebase_absolute(annotations, pathlib.Path(data_root))
  return annotations


def rebase_absolute(
  clips: Sequence[ClipAnnotation], data_root: pathlib.Path
) -> list[ClipAnnotation]:
  """Re-roots absolute frame folders that do not exist under `data_root`.

  The reference's lists hold the authors' absolute paths (e.g.
  `/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face/02522`). The shortest trailing
  part of the first missing folder that exists under `data_root` (here
  `DFEW_Frame_Face/02522` or `02522`) fixes how many trailing components are kept for
  every missing absolute folder; the clip id becomes that relative part. When no trailing
  part exists, the clips are returned unchanged and validation reports the folders.
  """
  missing = [c for c in clips if c.frame_dir.is_absolute() and not c.frame_dir.exists()]
  if not missing:
    return list(clips)
  parts = missing[0].frame_dir.parts[1:]  # without the root '/'
  keep = next(
    (k for k in range(1, len(parts) + 1) if (data_root / pathlib.Path(*parts[-k:])).is_dir()), None
  )
  if keep is None:
    return list(clips)
  out = []
  for clip in clips:
    if clip.frame_dir.is_absolute() and not clip.frame_dir.exists():
      tail = pathlib.Path(*clip.frame_dir.parts[-keep:])
      clip = dataclasses.replace(clip, frame_dir=data_root / tail, clip_id=tail.as_posix())
    out.append(clip)
  return out


def list_frames(frame_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Returns the image files of `frame_dir` sorted by file name as strings.

  Hidden files, sub-folders and files without an image extension are left out.

  Raises:
    FileNotFoundError / NotADirectoryError: `frame_dir` is missing or not a folder.
  """
  frame_dir = pathlib.Path(frame_dir)
  return [frame_dir / name for name in _frame_names(frame_dir)]


def _frame_names(frame_dir: str | os.PathLike[str]) -> list[str]:
  """The sorted file names `list_frames` keeps (plain strings: the loader lists a folder per
  clip read, and a pathlib object per frame cost ~15% of a clip's CPU time)."""
  names = []
  with os.scandir(frame_dir) as entries:
    for entry in entries:
      if (
        not entry.name.startswith(".")
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        and entry.is_file()
      ):
        names.append(entry.name)
  names.sort()
  return names


class FrameFolderSource:
  """Random-access clip source over frame folders (the record interface of data_api).

  `source[i]` is `{'clip_id': str, 'label': int, 'num_frames': int, 'frames': list[str],
  'origin': 'file:line'}`. The folder is listed when the record is read, so building a
  source over tens of thousands of clips is instant; `frames` may then hold more or fewer
  files than `num_frames` (the pipeline and `validate` report that).
  """

  def __init__(self, annotations: Sequence[ClipAnnotation]):
    self.annotations = list(annotations)

  @classmethod
  def from_file(
    cls,
    path: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
  ) -> FrameFolderSource:
    """Reads an annotation list (see `read_annotations`) into a source."""
    return cls(read_annotations(path, data_root=data_root, num_classes=num_classes))

  def __len__(self) -> int:
    return len(self.annotations)

  def __getitem__(self, index: int) -> dict[str, Any]:
    clip = self.annotations[index]
    folder = os.fspath(clip.frame_dir)
    try:
      names = _frame_names(folder)
    except FileNotFoundError:
      raise FileNotFoundError(
        f"{clip.origin}: frame folder {clip.frame_dir} does not exist"
      ) from None
    except NotADirectoryError:
      raise NotADirectoryError(f"{clip.origin}: {clip.frame_dir} is not a folder") from None
    return {
      "clip_id": clip.clip_id,
      "label": clip.label,
      "num_frames": clip.num_frames,
      "frames": [os.path.join(folder, name) for name in names],
      "origin": clip.origin,
    }

  @property
  def labels(self) -> list[int]:
    """Labels of all clips, in order (no disk access)."""
    return [clip.label for clip in self.annotations]
