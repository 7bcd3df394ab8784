"""Checks an annotation list against the frame folders it names, reporting every problem.

The reference trusts its lists: a folder with fewer frames than listed crashes it mid-epoch,
extra frames are silently ignored, and corrupt frames stop a worker. This module finds all
of that up front, each problem with the annotation file and line:

  errors:   malformed line (field count, non-integer), non-positive frame count, label
            outside the class list, duplicate clip, missing folder, no image files, fewer or
            more image files than listed, unreadable / empty / corrupt / truncated image,
            frames of one clip in different sizes, non-RGB image under rgb_policy='reject'.
  warnings: non-RGB image under rgb_policy='convert' (converted to RGB when loaded, as the
            reference does), non-image files in a frame folder (ignored).

Used by the CLI below, the dataset builder, and the trainer at start-up:

  python -m dfer_clip_jax.data.validate --annotations=train.txt --data_root=/data/DFEW \
      --classes=dfew

The exit status is 1 when any error is found, 0 otherwise (warnings allowed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence

from PIL import Image

from dfer_clip_jax.data import annotations as annotations_lib
from dfer_clip_jax.data import augment

RGB_POLICIES = ("convert", "reject")

_MODE_NAMES = {
  "1": "1-bit black and white",
  "L": "grey",
  "LA": "grey + alpha",
  "La": "grey + premultiplied alpha",
  "P": "palette",
  "PA": "palette + alpha",
  "RGBA": "RGB + alpha; the alpha channel is dropped",
  "RGBa": "RGB + premultiplied alpha",
  "RGBX": "RGB + padding",
  "CMYK": "CMYK",
  "YCbCr": "YCbCr",
  "LAB": "Lab",
  "HSV": "HSV",
  "I": "32-bit integer grey; values above 255 are clipped by the conversion",
  "F": "32-bit float grey; values are clipped to 0..255 by the conversion",
  "I;16": "16-bit grey; values above 255 are clipped by the conversion",
  "I;16B": "16-bit grey; values above 255 are clipped by the conversion",
  "I;16L": "16-bit grey; values above 255 are clipped by the conversion",
  "I;16N": "16-bit grey; values above 255 are clipped by the conversion",
}

# How many file names a per-clip message lists before summarising.
_MAX_NAMES = 3


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: where (annotation file and line), which clip, what kind, what exactly."""

  file: str
  line: int | None
  clip: str
  kind: str
  message: str
  severity: str = "error"  # 'error' | 'warning'

  def format(self) -> str:
    where = f"{self.file}:{self.line}" if self.line is not None else self.file
    clip = f" {self.clip}:" if self.clip else ""
    return f"{where}: {self.severity} [{self.kind}]{clip} {self.message}"


class ValidationError(ValueError):
  """Raised by `ValidationReport.raise_for_errors` when a list has errors."""


@dataclasses.dataclass
class ValidationReport:
  """Every problem found in one annotation list (or list of annotations)."""

  problems: list[Problem]
  num_clips: int
  rgb_policy: str

  @property
  def errors(self) -> list[Problem]:
    return [p for p in self.problems if p.severity == "error"]

  @property
  def warnings(self) -> list[Problem]:
    return [p for p in self.problems if p.severity == "warning"]

  @property
  def ok(self) -> bool:
    """True when there is no error (warnings allowed)."""
    return not self.errors

  @property
  def bad_lines(self) -> set[int]:
    """Annotation lines with at least one error (e.g. to drop them under a skip policy)."""
    return {p.line for p in self.errors if p.line is not None}

  def format(self) -> str:
    """One line per problem, then a summary line."""
    lines = [p.format() for p in self.problems]
    lines.append(
      f"{self.num_clips} clips checked: {len(self.errors)} errors, "
      f"{len(self.warnings)} warnings (rgb_policy={self.rgb_policy!r})"
    )
    return "\n".join(lines)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def merge(cls, shards: Sequence[dict]) -> ValidationReport:
    """One report from the `to_json()`s of the shards of one list (see `validate_clips`)."""
    problems = [Problem(**p) for shard in shards for p in shard["problems"]]
    problems.sort(key=_problem_order)
    return cls(
      problems=problems, num_clips=shards[0]["num_clips"], rgb_policy=shards[0]["rgb_policy"]
    )

  def raise_for_errors(self) -> None:
    """Raises `ValidationError` listing every error, if there is any."""
    if not self.ok:
      raise ValidationError("\n".join(p.format() for p in self.errors))


def _problem_order(p: Problem) -> tuple[str, int]:
  return (p.file, p.line if p.line is not None else -1)


def _names(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_MAX_NAMES])
  return shown + (f" and {len(paths) - _MAX_NAMES} more" if len(paths) > _MAX_NAMES else "")


def _check_image(path: pathlib.Path) -> tuple[str | None, str | None, tuple[int, int] | None]:
  """Decodes one image fully. Returns (error message, mode, size)."""
  try:
    if os.path.getsize(path) == 0:
      return "is empty (0 bytes)", None, None
    with Image.open(path) as im:
      im.load()  # Decodes all pixel data: catches corrupt and truncated files.
      return None, im.mode, im.size
  except Exception as e:  # PIL raises several types; every one means "unusable frame".
    return f"cannot be decoded: {type(e).__name__}: {e}", None, None


def _check_clip(
  clip: annotations_lib.ClipAnnotation, check_images: bool, rgb_policy: str
) -> list[Problem]:
  """All problems of one clip's folder and frames."""

  def problem(kind, message, severity="error"):
    return Problem(str(clip.source), clip.line_no, clip.clip_id, kind, message, severity)

  folder = clip.frame_dir
  if not folder.exists():
    return [problem("missing_folder", f"frame folder {folder} does not exist")]
  if not folder.is_dir():
    return [problem("missing_folder", f"{folder} is not a folder")]
  frames = annotations_lib.list_frames(folder)
  frame_names = {p.name for p in frames}
  others = sorted(
    e.name
    for e in os.scandir(folder)
    if e.is_file() and not e.name.startswith(".") and e.name not in frame_names
  )
  problems = []
  if others:
    problems.append(
      problem(
        "ignored_files",
        f"{len(others)} non-image files are ignored: {_names(others)} (frames are files "
        f"ending in {', '.join(sorted(annotations_lib.IMAGE_EXTENSIONS))})",
        "warning",
      )
    )
  if not frames:
    problems.append(
      problem("no_frames", f"folder {folder} holds no image files, the list says {clip.num_frames}")
    )
    return problems
  if len(frames) < clip.num_frames:
    problems.append(
      problem(
        "too_few_frames",
        f"folder has {len(frames)} image files, the list says {clip.num_frames}: sampling "
        f"would read past the last frame",
      )
    )
  elif len(frames) > clip.num_frames:
    problems.append(
      problem(
        "too_many_frames",
        f"folder has {len(frames)} image files, the list says {clip.num_frames}: the sampler "
        f"would use only the first {clip.num_frames} (sorted by name) and ignore the rest",
      )
    )
  if not check_images:
    return problems
  modes = collections.defaultdict(list)
  sizes = collections.defaultdict(list)
  for path in frames:
    error, mode, size = _check_image(path)
    if error is not None:
      problems.append(problem("unreadable_image", f"image {path.name} {error}"))
      continue
    sizes[size].append(path.name)
    if mode != "RGB":
      modes[mode].append(path.name)
  for mode, names in modes.items():
    what = f"mode {mode!r} ({_MODE_NAMES.get(mode, 'not RGB')})"
    count = f"{len(names)} of {len(frames)} images have {what}: {_names(names)}"
    if rgb_policy == "convert":
      problems.append(
        problem(
          "non_rgb", f"{count}; converted to RGB when loaded (rgb_policy='convert')", "warning"
        )
      )
    else:
      problems.append(problem("non_rgb", f"{count}; rejected (rgb_policy='reject')"))
  if len(sizes) > 1:
    common = max(sizes, key=lambda s: len(sizes[s]))
    odd = [f"{names[0]} is {s[0]}x{s[1]}" for s, names in sizes.items() if s != common]
    problems.append(
      problem(
        "mixed_sizes",
        f"frames differ in size (most are {common[0]}x{common[1]}, {'; '.join(odd)}): "
        f"one crop is applied to all frames of a clip",
      )
    )
  return problems


def _check_list(
  clips: Sequence[annotations_lib.ClipAnnotation], num_classes: int | None
) -> tuple[list[annotations_lib.ClipAnnotation], list[Problem]]:
  """Label range and duplicate checks for annotations that did not come from a file here."""
  good, problems, first = [], [], {}
  for clip in clips:

    def problem(kind, message):
      return Problem(str(clip.source), clip.line_no, clip.clip_id, kind, message)

    if clip.num_frames < 1:
      problems.append(problem("bad_count", f"num_frames must be positive, got {clip.num_frames}"))
      continue
    if clip.label < 0 or (num_classes is not None and clip.label >= num_classes):
      expected = f"in [0, {num_classes - 1}]" if num_classes is not None else "non-negative"
      problems.append(problem("bad_label", f"label must be {expected}, got {clip.label}"))
      continue
    key = os.path.normpath(clip.frame_dir)
    if key in first:
      problems.append(problem("duplicate_clip", f"clip is listed again (first at {first[key]})"))
      continue
    first[key] = clip.origin
    good.append(clip)
  return good, problems


def validate_clips(
  annotations_or_path: str | os.PathLike[str] | Sequence[annotations_lib.ClipAnnotation],
  *,
  data_root: str | os.PathLike[str] | None = None,
  class_names: Sequence[str] | None = None,
  num_classes: int | None = None,
  check_images: bool = True,
  rgb_policy: str = "convert",
  num_threads: int = 16,
  progress: bool = False,
  shard: tuple[int, int] = (0, 1),
) -> ValidationReport:
  """Checks an annotation list and its frame folders; returns every problem found.

  Args:
    annotations_or_path: an annotation list file, or already-read `ClipAnnotation`s.
    data_root: joined with relative frame folders (file input only; see
      `annotations.read_annotations`).
    class_names: the class list; labels must index into it.
    num_classes: alternative to `class_names` (one of the two, or neither to only require
      non-negative labels).
    check_images: decode every frame fully (catches corrupt / truncated files; the slow
      part, run on `num_threads` threads since it is I/O bound and PIL releases the GIL).
    rgb_policy: 'convert' (non-RGB frames are a warning: the loader converts them) or
      'reject' (they are an error).
    num_threads: threads for the folder and image checks.
    progress: show a tqdm progress bar over clips.
    shard: (i, n): check the folders of clips i, i + n, i + 2n, ... only, and report the
      list's own problems (lines, labels, duplicates) only when i is 0; `ValidationReport.merge`
      joins the n shards' reports into the whole list's. For n processes sharing the work.

  Returns:
    A `ValidationReport`; `.ok` is False when any error was found.
  """
  if rgb_policy not in RGB_POLICIES:
    raise ValueError(f"rgb_policy must be one of {RGB_POLICIES}, got {rgb_policy!r}")
  if class_names is not None:
    if num_classes is not None and num_classes != len(class_names):
      raise ValueError(f"num_classes={num_classes} disagrees with {len(class_names)} class_names")
    num_classes = len(class_names)
  if check_images:
    augment._require_strict_truncation()  # pylint: disable=protected-access
  if isinstance(annotations_or_path, (str, os.PathLike)):
    path = pathlib.Path(annotations_or_path)
    clips, line_errors = annotations_lib.scan_annotations(
      path, data_root=data_root, num_classes=num_classes
    )
    problems = [Problem(str(path), e.line, "", e.kind, e.message) for e in line_errors]
    num_lines = len(clips) + len(line_errors)
    if num_lines == 0:
      problems.append(Problem(str(path), None, "", "malformed_line", "the list holds no clips"))
  else:
    clips, problems = _check_list(list(annotations_or_path), num_classes)
    num_lines = len(clips) + len(problems)
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard {shard}: expected (i, n) with 0 <= i < n")
  clips = clips[index::count]
  if index:
    problems = []

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = pool.map(lambda c: _check_clip(c, check_images, rgb_policy), clips)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top

      results = tqdm.tqdm(results, total=len(clips), unit="clip", desc="validating")
    for clip_problems in results:
      problems.extend(clip_problems)
  problems.sort(key=_problem_order)
  return ValidationReport(problems=problems, num_clips=num_lines, rgb_policy=rgb_policy)


def main(argv: Sequence[str]) -> int:
  """CLI entry point (absl): validates each --annotations file, prints the report."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax.data import datasets  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  from dfer_clip_jax import cli  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  classes_file = cli.absolute(f.classes_file)
  class_names = datasets.get(f.classes).classes(classes_file) if f.classes else None
  any_error = False
  for path in f.annotations:
    report = validate_clips(
      cli.absolute(path),
      data_root=cli.absolute(f.data_root),
      class_names=class_names,
      num_classes=f.num_classes,
      check_images=f.check_images,
      rgb_policy=f.rgb_policy,
      num_threads=f.threads,
      progress=f.progress,
    )
    print(report.format(), flush=True)
    any_error |= not report.ok
  return 1 if any_error else 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax.data import datasets  # pylint: disable=g-import-not-at-top

  flags.DEFINE_multi_string("annotations", None, "Annotation list(s) to check.", required=True)
  flags.DEFINE_string(
    "data_root", None, "Folder joined with relative frame folders (default: the list's folder)."
  )
  flags.DEFINE_integer("num_classes", None, "Number of classes (labels must be below it).")
  flags.DEFINE_enum(
    "classes", None, datasets.names(), "Dataset whose class list labels must index into."
  )
  flags.DEFINE_string("classes_file", "", "The custom dataset's class names, one per line.")
  flags.DEFINE_enum(
    "rgb_policy",
    "convert",
    list(RGB_POLICIES),
    "convert: non-RGB frames are a warning; reject: an error.",
  )
  flags.DEFINE_boolean("check_images", True, "Decode every frame (slow, thorough).")
  flags.DEFINE_integer("threads", 16, "Threads for the checks.")
  flags.DEFINE_boolean("progress", sys.stderr.isatty(), "Show a progress bar.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)
