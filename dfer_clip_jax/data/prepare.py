r"""Prepares your own labelled videos for training: face crops as frame folders, class list and
annotation lists of the `custom` dataset (configs/custom.py).

  python -m dfer_clip_jax.data.prepare --videos=labels.csv --out=data/mine
  python -m dfer_clip_jax.data.prepare --videos=videos --out=data/mine   # videos/<class>/*.mp4

--videos is a CSV file with the columns `video,label` and optionally `split` (train or test on
every row; video paths relative to the CSV's folder), or a folder holding one sub-folder of
videos per class. Without splits, a stratified train/test split of the prepared videos is drawn
(--test_fraction, --seed), the same on every rerun that prepares the same videos.

Each video is read and cropped exactly as `python -m dfer_clip_jax.predict` reads and crops it
(the same decoder, face detector, tracker, smoothing and square crop; video/crops.py), so a
model trained on the result sees what prediction will show it: the main face's crop, resized to
--size, at --fps (default: the video's own rate, at most --max_fps), over the time span where
the face is tracked. --face=none keeps whole frames (footage already cropped to the face).
Written to --out:

  frames/<class>/<video>/00001.jpg ...  one folder per prepared video
  frames/<class>/<video>.json           what was done for that video (its report entry)
  classes.txt                           class names, one per line, in label order (sorted)
  train.txt, test.txt                   annotation lists `frames/<class>/<video> <frames> <label>`
  prepare_report.json                   per video: status, frames written, face-track coverage,
                                        time span, or why it was skipped

A video that cannot be read, is shorter than --min_frames frames, or shows no face is skipped
with its reason. Reruns are cheap and safe: a video whose folder is complete is not redone, and
a folder is only complete once renamed from its temporary name (`.<video>.partial`, removed by
the next run when a killed run left it). Exit status: 0 every video prepared, 1 some skipped,
2 nothing prepared (or a bad option or label list).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from dfer_clip_jax import cli
from dfer_clip_jax.video import crops, sources

FORMAT = "dfer_clip_jax.prepare/1"
CLASSES = "classes.txt"
REPORT = "prepare_report.json"
FRAMES = "frames"
SPLITS = ("train", "test")
PARTIAL = ".partial"
# Test hook: the process kills itself (SIGKILL) while writing the frames of the n-th video it
# prepares, as a crash or `kill -9` would.
TEST_KILL_ENV = "DFER_TEST_PREPARE_KILL_AT"


class LabelsError(ValueError):
  """The label list (CSV or class folders) is unusable; names the file and line."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One labelled video and where its frames go."""

  video: pathlib.Path
  label: str
  split: str | None  # train | test as the CSV gives it; None: drawn (`draw_splits`)
  folder: str  # relative to --out: frames/<class>/<name>


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every video is turned into (the CLI flags of the same names)."""

  size: int = 224
  fps: float = 0.0  # 0: the video's own rate, capped at max_fps
  max_fps: float = 30.0
  min_frames: int = 16
  quality: int = 95
  faces: crops.FaceOptions = crops.DEFAULTS

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"--size must be positive, got {self.size}")
    if self.fps < 0 or self.max_fps <= 0:
      raise ValueError(f"--fps must be >= 0 and --max_fps positive, got {self.fps}, {self.max_fps}")
    if self.min_frames < 1:
      raise ValueError(f"--min_frames must be positive, got {self.min_frames}")
    if not 1 <= self.quality <= 100:
      raise ValueError(f"--quality must be in 1..100, got {self.quality}")


def _safe(name: str) -> str:
  """A file-name-safe, space-free form of a name (annotation lists split on spaces)."""
  return re.sub(r"[^\w.-]+", "_", name).strip("._") or "video"


def read_labels(videos: str | os.PathLike) -> list[tuple[pathlib.Path, str, str | None]]:
  """(video, label, split or None) of each video of a CSV file or a folder of class folders.

  Raises:
    LabelsError: a missing column or value, an unknown split, splits on some rows only.
  """
  path = pathlib.Path(videos)
  if path.is_dir():
    rows = []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir() and p.name[0] != "."):
      for f in sorted(class_dir.iterdir()):
        if f.is_file() and f.name[0] != "." and f.suffix.lower() in sources.VIDEO_EXTENSIONS:
          rows.append((f, class_dir.name, None))
    if not rows:
      raise LabelsError(
        f"{path}: no videos found in class sub-folders (expected {path}/<class>/*.mp4 with "
        f"one of the extensions {', '.join(sorted(sources.VIDEO_EXTENSIONS))})"
      )
    return rows
  if not path.is_file():
    raise LabelsError(f"--videos={path} does not exist")
  with open(path, newline="", encoding="utf-8-sig") as fh:
    reader = csv.DictReader(fh)
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("video", "label") if c not in columns]
    if missing:
      raise LabelsError(
        f"{path}:1: the header must name the columns video,label (and optionally split); "
        f"got {columns}, missing {missing}"
      )
    rows = []
    for line_no, row in enumerate(reader, start=2):
      row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
      if not any(row.values()):
        continue
      if not row["video"] or not row["label"]:
        raise LabelsError(f"{path}:{line_no}: empty video or label in {row}")
      split = row.get("split") or None
      if split is not None and split not in SPLITS:
        raise LabelsError(f"{path}:{line_no}: split {split!r}, expected train or test")
      video = pathlib.Path(row["video"]).expanduser()
      rows.append((video if video.is_absolute() else path.parent / video, row["label"], split))
  if not rows:
    raise LabelsError(f"{path}: no videos listed")
  given = [s is not None for _, _, s in rows]
  if any(given) and not all(given):
    raise LabelsError(
      f"{path}: the split column is filled on {sum(given)} of {len(rows)} rows; fill it on "
      "every row, or leave it out for a stratified split (--test_fraction)"
    )
  return rows


def plan_entries(
  rows: Sequence[tuple[pathlib.Path, str, str | None]],
) -> tuple[list[str], list[Entry]]:
  """(class names sorted, entries ordered by class and path, each with its frame folder)."""
  classes = sorted({label for _, label, _ in rows})
  used: set[str] = set()
  entries = []
  for video, label, split in sorted(rows, key=lambda r: (r[1], str(r[0]))):
    base = f"{FRAMES}/{_safe(label)}/{_safe(video.stem)}"
    folder, n = base, 2
    while folder in used:
      folder, n = f"{base}_{n}", n + 1
    used.add(folder)
    entries.append(Entry(video, label, split, folder))
  return classes, entries


def draw_splits(
  entries: Sequence[Entry], usable: Sequence[bool], *, test_fraction: float, seed: int
) -> list[str | None]:
  """Each entry's split: the given one, else a stratified draw among the usable (prepared)
  videos: round(n * test_fraction) of each class's n for test (at least one of two or more,
  never all), seeded, so the same videos give the same split on every rerun. None: unusable."""
  if not 0 <= test_fraction < 1:
    raise ValueError(f"--test_fraction must be in [0, 1), got {test_fraction}")
  out: list[str | None] = [e.split if ok else None for e, ok in zip(entries, usable)]
  rng = np.random.default_rng(seed)
  for c in sorted({e.label for e in entries}):
    members = [i for i, e in enumerate(entries) if e.label == c and usable[i] and not e.split]
    n = len(members)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
      n_test = min(max(n_test, 1), n - 1)
    test = set(rng.permutation(n)[:n_test].tolist())
    for k, i in enumerate(members):
      out[i] = "test" if k in test else "train"
  return out


class Skipped(Exception):
  """The video is not prepared; the message says why."""


_local = threading.local()
_started = [0]  # videos this process began writing (for the test hook)


def _detector(options: crops.FaceOptions):
  # One detector per thread: OpenCV's cascades are not documented as safe to share.
  key = (options.face, options.min_face)
  if getattr(_local, "key", None) != key:
    _local.key, _local.detector = key, options.detector()
  return _local.detector


def _target_frames(times: np.ndarray, fps: float, start: float, end: float) -> np.ndarray:
  """Indices of the frames shown at `fps` ticks over [start, end] (each frame once)."""
  ticks = np.arange(start, end + 1e-6, 1.0 / fps)
  k = np.searchsorted(times, ticks + 1e-6, side="right") - 1
  return np.unique(np.clip(k, 0, len(times) - 1))


def prepare_video(entry: Entry, out: pathlib.Path, settings: Settings) -> dict[str, Any]:
  """Writes one video's frame folder; returns its report entry.

  Raises:
    Skipped: unreadable, too short, or no face (the message says which and why).
  """
  started = time.time()
  faces = settings.faces
  item = sources.InputItem(entry.video, sources.VIDEO)
  if not entry.video.is_file():
    raise Skipped(f"{entry.video} does not exist")
  reader = sources.open_input(item)
  detector = _detector(faces)
  try:
    times, observations = crops.scan(reader, detector, faces.detect_fps)
    info = reader.info
    fps = settings.fps or min(info.average_fps, settings.max_fps)
    track, coverage = None, None
    start, end = 0.0, float(times[-1])
    if detector is not None:
      track = crops.find_tracks(
        entry.video, observations, max_gap_s=faces.max_gap_s, min_face=faces.min_face
      )[0]
      # Frames near the face's detections: a face lost for longer is not guessed at.
      start = max(0.0, track.start - faces.max_gap_s / 2)
      end = min(end, track.end + faces.max_gap_s / 2)
      coverage = len(track.times) / len(observations)
    wanted = _target_frames(times, fps, start, end)
  except sources.InputError as e:
    raise Skipped(str(e)) from e
  if len(wanted) < settings.min_frames:
    where = "" if track is None else f" with the face in view ({start:.2f}-{end:.2f} s)"
    raise Skipped(
      f"{entry.video}: too short: {len(wanted)} frames at {fps:g} fps{where}, "
      f"--min_frames={settings.min_frames} needed (the video has {info.num_frames} frames over "
      f"{info.duration_s:.2f} s)"
    )
  final = out / entry.folder
  partial = final.parent / f".{final.name}{PARTIAL}"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  _started[0] += 1
  kill_at = os.environ.get(TEST_KILL_ENV)
  position = {int(f): k for k, f in enumerate(wanted, start=1)}
  written = 0
  try:
    for rec in reader.frames(lambda i, _: i in position):
      if rec.rgb is None:
        continue
      box = None
      if track is not None:
        _, box = crops.crop_box_at(
          track,
          rec.time,
          smooth_s=faces.smooth_s,
          margin=faces.margin,
          width=info.width,
          height=info.height,
        )
      Image.fromarray(crops.crop_frame(rec.rgb, box, settings.size)).save(
        partial / f"{position[rec.index]:05d}.jpg", quality=settings.quality
      )
      written += 1
      if kill_at and int(kill_at) == _started[0]:
        os.kill(os.getpid(), signal.SIGKILL)
  except sources.InputError as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise Skipped(str(e)) from e
  if written != len(wanted):
    shutil.rmtree(partial, ignore_errors=True)
    raise Skipped(f"{entry.video}: {len(wanted) - written} frames were gone on the second reading")
  result = {
    "status": "prepared",
    "frames": written,
    "fps": round(fps, 3),
    "time_span_s": [round(float(times[wanted[0]]), 3), round(float(times[wanted[-1]]), 3)],
    "face_coverage": None if coverage is None else round(coverage, 3),
    "face_detections": None if track is None else len(track.times),
    "frames_examined": len(observations) if detector is not None else None,
    "source": {
      k: getattr(info, k)
      for k in (
        "width",
        "height",
        "num_frames",
        "duration_s",
        "average_fps",
        "variable_frame_rate",
        "rotation",
      )
    },
    "seconds": round(time.time() - started, 2),
  }
  # The record first, then the rename: a folder under its final name is always complete.
  _record_path(final).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  shutil.rmtree(final, ignore_errors=True)
  os.replace(partial, final)
  return result


def _record_path(folder: pathlib.Path) -> pathlib.Path:
  return folder.parent / f"{folder.name}.json"


def _run_one(entry: Entry, out: pathlib.Path, settings: Settings) -> dict[str, Any]:
  try:
    return prepare_video(entry, out, settings)
  except Skipped as e:
    return {"status": "skipped", "reason": str(e)}
  except Exception as e:  # pylint: disable=broad-exception-caught
    # An unforeseen problem with one file must not stop the others.
    return {"status": "skipped", "reason": f"{entry.video}: {type(e).__name__}: {e}"}


def _done_before(entry: Entry, out: pathlib.Path) -> dict[str, Any] | None:
  final = out / entry.folder
  record = _record_path(final)
  if not final.is_dir() or not record.is_file():
    return None
  result = json.loads(record.read_text(encoding="utf-8"))
  return {**result, "status": "already prepared"}


def _remove_partials(out: pathlib.Path) -> list[str]:
  removed = []
  for p in sorted((out / FRAMES).glob(f"*/.*{PARTIAL}")):
    shutil.rmtree(p, ignore_errors=True)
    removed.append(str(p.relative_to(out)))
  return removed


def _progress(done: int, total: int, started: float, line: str) -> None:
  elapsed = time.time() - started
  eta = elapsed / done * (total - done)
  print(
    f"[{done}/{total}] {100 * done / total:3.0f}%  {elapsed:5.1f} s, ETA {eta:5.1f} s  {line}",
    file=sys.stderr,
    flush=True,
  )


def prepare(
  videos: str | os.PathLike,
  out: str | os.PathLike,
  settings: Settings = Settings(),
  *,
  test_fraction: float = 0.2,
  seed: int = 0,
  workers: int = 1,
) -> dict[str, Any]:
  """Prepares every video of `videos` (a CSV or a folder of class folders) into `out`.

  Returns:
    The report (also written to out/prepare_report.json).

  Raises:
    LabelsError, ValueError: a bad label list or option (nothing is written then).
  """
  out = pathlib.Path(out)
  if not 0 <= test_fraction < 1:
    raise ValueError(f"--test_fraction must be in [0, 1), got {test_fraction}")
  classes, entries = plan_entries(read_labels(videos))
  classes_path = out / CLASSES
  if classes_path.is_file():
    from dfer_clip_jax.data import datasets  # pylint: disable=g-import-not-at-top

    before = list(datasets.read_classes_file(classes_path))
    if before != classes:
      raise LabelsError(
        f"{out} was prepared with the classes {before}, these videos have {classes}: "
        "prepare them into a new --out"
      )
  out.mkdir(parents=True, exist_ok=True)
  removed = _remove_partials(out)
  results: dict[int, dict[str, Any]] = {}
  todo = []
  for i, e in enumerate(entries):
    earlier = _done_before(e, out)
    if earlier is None:
      todo.append(i)
    else:
      results[i] = earlier
  print(
    f"{len(entries)} videos of {len(classes)} classes; {len(results)} prepared before, "
    f"{len(todo)} to do with {workers} worker{'s' * (workers != 1)}",
    file=sys.stderr,
    flush=True,
  )
  started = time.time()

  def record(i: int, result: dict[str, Any], n: int) -> None:
    results[i] = result
    e = entries[i]
    what = f"{result['frames']} frames" if result["status"] == "prepared" else result["reason"]
    _progress(n, len(todo), started, f"{e.video.name}: {result['status']}: {what}")

  if workers <= 1:
    for n, i in enumerate(todo, start=1):
      record(i, _run_one(entries[i], out, settings), n)
  else:
    # Threads: decoding (FFmpeg), detection (OpenCV), resizing and JPEG encoding (Pillow)
    # release the GIL; see the README for the measured speed-up.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      futures = {pool.submit(_run_one, entries[i], out, settings): i for i in todo}
      for n, fut in enumerate(concurrent.futures.as_completed(futures), start=1):
        record(futures[fut], fut.result(), n)

  label_of = {c: k for k, c in enumerate(classes)}
  usable = [results[i]["status"] != "skipped" for i in range(len(entries))]
  splits = draw_splits(entries, usable, test_fraction=test_fraction, seed=seed)
  lines: dict[str, list[str]] = {s: [] for s in SPLITS}
  videos_out = []
  for i, (e, split) in enumerate(zip(entries, splits)):
    r = results[i]
    if split is not None:
      lines[split].append(f"{e.folder} {r['frames']} {label_of[e.label]}")
    videos_out.append(
      {"video": str(e.video), "label": e.label, "split": split, "folder": e.folder, **r}
    )
  counts = {
    s: sum(v["status"] == s for v in videos_out)
    for s in ("prepared", "already prepared", "skipped")
  }
  report = {
    "format": FORMAT,
    "classes": classes,
    "settings": {**dataclasses.asdict(settings), "test_fraction": test_fraction, "seed": seed},
    "counts": counts,
    "splits": {s: len(lines[s]) for s in SPLITS},
    "removed_partial_folders": removed,
    "videos": videos_out,
  }
  if counts["prepared"] + counts["already prepared"]:
    classes_path.write_text("\n".join(classes) + "\n", encoding="utf-8")
    for s in SPLITS:
      (out / f"{s}.txt").write_text("".join(f"{ln}\n" for ln in lines[s]), encoding="utf-8")
  (out / REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
  return report


_PROG = "python -m dfer_clip_jax.data.prepare"


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "videos",
    None,
    "CSV with video,label[,split] columns, or a folder of class folders of videos",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_string("out", None, "output folder (the dataset)", required=True, flag_values=fv)
  flags.DEFINE_integer("size", Settings.size, "side of the written square frames", flag_values=fv)
  flags.DEFINE_float(
    "fps",
    Settings.fps,
    "frames per second written (0: the video's own, at most --max_fps)",
    flag_values=fv,
  )
  flags.DEFINE_float("max_fps", Settings.max_fps, "cap of the default --fps", flag_values=fv)
  flags.DEFINE_integer(
    "min_frames",
    Settings.min_frames,
    "videos giving fewer frames are skipped (a clip samples 16)",
    flag_values=fv,
  )
  flags.DEFINE_integer("quality", Settings.quality, "JPEG quality (1..100)", flag_values=fv)
  flags.DEFINE_float(
    "test_fraction",
    0.2,
    "share of each class drawn for the test split when the CSV gives no split",
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "seed of that split", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "videos prepared in parallel (threads)", flag_values=fv)
  crops.define_flags(fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(_PROG, __doc__, _define, argv)
  try:
    settings = Settings(
      size=args.size,
      fps=args.fps,
      max_fps=args.max_fps,
      min_frames=args.min_frames,
      quality=args.quality,
      faces=crops.options_from_flags(args),
    )
    report = prepare(
      args.videos,
      args.out,
      settings,
      test_fraction=args.test_fraction,
      seed=args.seed,
      workers=args.workers,
    )
  except (ValueError, OSError) as e:
    print(f"{_PROG}: error: {e}", file=sys.stderr)
    return 2
  skipped = [v for v in report["videos"] if v["status"] == "skipped"]
  for v in skipped:
    print(f"skipped: {v['reason']}", file=sys.stderr)
  counts, out = report["counts"], pathlib.Path(args.out)
  ready = counts["prepared"] + counts["already prepared"]
  print(
    f"{counts['prepared']} prepared, {counts['already prepared']} prepared before, "
    f"{counts['skipped']} skipped; train {report['splits']['train']}, test "
    f"{report['splits']['test']} clips; report: {out / REPORT}"
  )
  if not ready:
    return 2
  print(
    "next: python -m dfer_clip_jax.main --config=configs/custom.py:data="
    f"{out} --workdir=runs/{_safe(out.name)}"
  )
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
