r"""Runs a trained DFER-CLIP model on your own videos.

  python -m dfer_clip_jax.predict --checkpoint=runs/demo --input='clips/*.mp4' --out=predictions

--checkpoint is a training workdir (its latest usable step, or --which=best / a step number),
one checkpoint folder, or a reference checkpoint converted by `python -m dfer_clip_jax.convert`.
Class names, input size, frames per clip and preprocessing come from the checkpoint.
--input (repeatable) is a video file (mp4, avi, mov, webm, mkv, ...), a folder of frames (image
files sorted by name, at --fps), a folder of videos or of frame folders, or a glob of these.

For each input the faces are found (OpenCV Haar cascades on about --detect_fps frames per
second), linked over time and smoothed; the main face (or, with --all_faces, every face) is
cropped square with --margin around it and resized to the model's input like the evaluation
frames. --face=none uses whole frames (for inputs already cropped to the face). An input no
longer than --window_s is one clip sampled like the test sampler; a longer one is cut into
windows of --window_s every --stride_s. Written to --out/<input name>/:

  predictions.json   input metadata, model, options, and per face track and window: start / end
                     time, sampled frames, face and crop boxes, class probabilities, top class
  timeline.png       probability of each class over time (one panel per face)
  annotated.mp4      with --annotate: the video with face boxes and the current top class

and --out/summary.json lists every input with its status. The exit status is 0 when every input
succeeded, 1 when some failed (each with its error; the others are still processed), 2 when
nothing could start (no input found, unreadable checkpoint, bad option).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from dfer_clip_jax import cli, inference, restore
from dfer_clip_jax.video import crops, render, sources
from dfer_clip_jax.video import faces as faces_lib
from dfer_clip_jax.video import windows as windows_lib

FORMAT = "dfer_clip_jax.predict/1"
PREDICTIONS = "predictions.json"
TIMELINE = "timeline.png"
ANNOTATED = "annotated.mp4"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Options:
  """How inputs are turned into clips (the CLI flags of the same names); the face fields are
  `crops.FaceOptions`', shared with dataset preparation."""

  face: str = crops.DEFAULTS.face
  all_faces: bool = False
  window_s: float = 3.0
  stride_s: float = 1.0
  fps: float = 25.0
  detect_fps: float = crops.DEFAULTS.detect_fps
  margin: float = crops.DEFAULTS.margin
  min_face: float = crops.DEFAULTS.min_face
  smooth_s: float = crops.DEFAULTS.smooth_s
  max_gap_s: float = crops.DEFAULTS.max_gap_s
  annotate: bool = False

  def __post_init__(self):
    crops.options_from_flags(self)  # validates the face fields
    for name in ("window_s", "stride_s", "fps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class _Job:
  """One clip to classify: track `track` of the input (whole frames when that track is None)
  over window `window`."""

  track: int
  window: int
  frames: np.ndarray  # (T,) frame indices


def _rounded(values, digits: int = 2) -> list[float]:
  return [round(float(v), digits) for v in values]


@dataclasses.dataclass
class _Plan:
  """Which clips to classify, and per track and frame the smoothed face box and square crop."""

  jobs: list[_Job]
  face_boxes: list[dict[int, np.ndarray]]
  crop_boxes: list[dict[int, tuple[int, int, int, int]]]


def _plan(tracks, windows, indices, times, width: int, height: int, options: Options) -> _Plan:
  plan = _Plan([], [], [])
  for k, tr in enumerate(tracks):
    # A window is classified for a face seen in it (or within half the allowed gap).
    covered = [
      tr is None or tr.seen_near(w.start_s, w.end_s, options.max_gap_s / 2) for w in windows
    ]
    needed = sorted({int(f) for c, idx in zip(covered, indices) if c for f in idx})
    if tr is None:
      full = np.array([0.0, 0.0, width, height])
      plan.face_boxes.append({f: full for f in needed})
      plan.crop_boxes.append({f: (0, 0, width, height) for f in needed})
    else:
      at = {
        f: crops.crop_box_at(
          tr, times[f], smooth_s=options.smooth_s, margin=options.margin, width=width, height=height
        )
        for f in needed
      }
      plan.face_boxes.append({f: face for f, (face, _) in at.items()})
      plan.crop_boxes.append({f: crop for f, (_, crop) in at.items()})
    plan.jobs += [_Job(k, w.index, idx) for w, idx, c in zip(windows, indices, covered) if c]
  return plan


def _track_entries(
  tracks, windows, indices, times, probs, plan: _Plan, class_names: list[str]
) -> list[dict[str, Any]]:
  """predictions.json's `tracks`: per track its detections, summary and windows."""
  entries = []
  for k, tr in enumerate(tracks):
    rows, valid = [], []
    for w, idx in zip(windows, indices):
      p = probs.get((k, w.index))
      row: dict[str, Any] = {
        "index": w.index,
        "start_s": round(w.start_s, 4),
        "end_s": round(w.end_s, 4),
        "frame_indices": [int(i) for i in idx],
        "frame_times_s": _rounded(times[idx], 4),
        "status": "ok" if p is not None else "no_face",
        "face_box": None,
        "crop_box": None,
        "probabilities": None,
        "top_class": None,
        "top_probability": None,
      }
      if p is not None:
        valid.append(p)
        row["face_box"] = _rounded(np.mean([plan.face_boxes[k][int(f)] for f in idx], 0), 1)
        row["crop_box"] = _rounded(np.mean([plan.crop_boxes[k][int(f)] for f in idx], 0), 1)
        row["probabilities"] = {c: round(float(v), 6) for c, v in zip(class_names, p)}
        top = int(np.argmax(p))
        row["top_class"], row["top_probability"] = class_names[top], round(float(p[top]), 6)
      rows.append(row)
    entry: dict[str, Any] = {"track_id": k}
    if tr is not None:
      entry.update(
        detections=len(tr.times),
        first_seen_s=round(tr.start, 4),
        last_seen_s=round(tr.end, 4),
        mean_face_box=_rounded(np.mean(np.stack(tr.boxes), axis=0), 1),
      )
    entry["summary"] = _track_summary(valid, class_names)
    entry["windows"] = rows
    entries.append(entry)
  return entries


def predict_input(
  item: sources.InputItem,
  predictor: inference.Predictor,
  options: Options,
  out_dir: pathlib.Path,
  *,
  detector: faces_lib.HaarFaceDetector | None = None,
  model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Predicts one input and writes its outputs into `out_dir`; returns the predictions dict.

  Raises:
    sources.InputError: the input is unreadable, or (face="auto") holds no face.
  """
  spec = predictor.spec
  class_names = list(spec.class_names)
  reader = sources.open_input(item, fps=options.fps)
  if options.face == "auto" and detector is None:
    detector = crops.options_from_flags(options).detector()
  if options.face == "none":
    detector = None

  times, observations = crops.scan(reader, detector, options.detect_fps)
  info = reader.info
  windows = windows_lib.make_windows(info.duration_s, options.window_s, options.stride_s)
  indices = [windows_lib.sample_frames(times, w.start_s, w.end_s, spec.num_frames) for w in windows]
  tracks: list[faces_lib.Track | None] = (
    [None]
    if detector is None
    else crops.find_tracks(
      item.path,
      observations,
      max_gap_s=options.max_gap_s,
      min_face=options.min_face,
      all_faces=options.all_faces,
    )
  )
  plan = _plan(tracks, windows, indices, times, info.width, info.height, options)
  probs = _classify(reader, plan, tracks, predictor)
  entries = _track_entries(tracks, windows, indices, times, probs, plan, class_names)

  prediction = {
    "format": FORMAT,
    "input": info.to_dict(),
    "model": model_info or inference.model_description(spec),
    "options": dataclasses.asdict(options),
    "face_detector": None
    if detector is None
    else {
      "name": detector.name,
      "frames_examined": len(observations),
      "detections": int(sum(len(d) for _, d in observations)),
    },
    "class_names": class_names,
    "tracks": entries,
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / PREDICTIONS).write_text(json.dumps(prediction, indent=1) + "\n", encoding="utf-8")
  series = [
    render.Series(
      title=("whole frame" if tr is None else f"face {k}") + f": {_summary_text(e['summary'])}",
      starts=np.array([w.start_s for w in windows]),
      ends=np.array([w.end_s for w in windows]),
      probs=[probs.get((k, w.index)) for w in windows],
    )
    for k, (tr, e) in enumerate(zip(tracks, entries))
  ]
  render.render_timeline(
    series,
    class_names,
    info.duration_s,
    title=f"{item.path.name}  ({info.duration_s:.2f} s, "
    f"{len(windows)} window{'s' * (len(windows) != 1)})",
  ).save(out_dir / TIMELINE)
  if options.annotate:
    _annotate(reader, out_dir / ANNOTATED, tracks, windows, probs, class_names, options)
  return prediction


def _classify(
  reader: sources.FrameReader, plan: _Plan, tracks, predictor: inference.Predictor
) -> dict[tuple[int, int], np.ndarray]:
  """Pass 2: crops the frames the plan's clips need and classifies each clip.

  Streams: a clip is classified as soon as its last frame is read, and a crop is dropped once
  every clip using it is done, so memory stays bounded by the windows' overlap on long videos.

  Returns:
    {(track, window): (C,) probabilities} for every job of the plan.
  """
  jobs, size = plan.jobs, predictor.spec.image_size
  uses: dict[int, set[int]] = {}
  done_at: dict[int, list[_Job]] = {}
  release_at: dict[int, list[tuple[int, int]]] = {}
  last_use: dict[tuple[int, int], int] = {}
  for job in jobs:
    end = int(job.frames.max())
    done_at.setdefault(end, []).append(job)
    for f in job.frames:
      uses.setdefault(int(f), set()).add(job.track)
      key = (job.track, int(f))
      last_use[key] = max(last_use.get(key, -1), end)
  for key, end in last_use.items():
    release_at.setdefault(end, []).append(key)

  cut: dict[tuple[int, int], np.ndarray] = {}
  queue: list[tuple[_Job, np.ndarray]] = []
  out: dict[tuple[int, int], np.ndarray] = {}

  def flush(final: bool) -> None:
    while len(queue) >= predictor.batch_size or (final and queue):
      batch = queue[: predictor.batch_size]
      del queue[: predictor.batch_size]
      p = predictor(np.stack([clip for _, clip in batch]))
      for (job, _), row in zip(batch, p):
        out[(job.track, job.window)] = row

  if not jobs:
    return out
  for rec in reader.frames(lambda i, t: i in uses):
    if rec.rgb is None:
      continue
    for k in uses[rec.index]:
      box = None if tracks[k] is None else plan.crop_boxes[k][rec.index]
      cut[(k, rec.index)] = crops.crop_frame(rec.rgb, box, size)
    for job in done_at.get(rec.index, []):
      queue.append((job, np.stack([cut[(job.track, int(f))] for f in job.frames])))
    for key in release_at.get(rec.index, []):
      del cut[key]
    flush(final=False)
  flush(final=True)
  missing = [j for j in jobs if (j.track, j.window) not in out]
  if missing:
    raise sources.InputError(
      f"{reader.info.path}: frame {int(missing[0].frames.max())} was "
      "not found on the second reading (did the file change?)"
    )
  return out


def _track_summary(valid: list[np.ndarray], class_names: list[str]) -> dict[str, Any]:
  if not valid:
    return {
      "windows_with_face": 0,
      "mean_probabilities": None,
      "top_class": None,
      "top_probability": None,
      "top_class_counts": {},
    }
  mean = np.mean(np.stack(valid), axis=0)
  top = int(np.argmax(mean))
  counts: dict[str, int] = {}
  for p in valid:
    name = class_names[int(np.argmax(p))]
    counts[name] = counts.get(name, 0) + 1
  return {
    "windows_with_face": len(valid),
    "mean_probabilities": {c: round(float(v), 6) for c, v in zip(class_names, mean)},
    "top_class": class_names[top],
    "top_probability": round(float(mean[top]), 6),
    "top_class_counts": counts,
  }


def _summary_text(summary: dict[str, Any]) -> str:
  if summary["top_class"] is None:
    return "no face in any window"
  return f"{summary['top_class']} ({100 * summary['top_probability']:.0f}% mean)"


def _annotate(reader, path, tracks, windows, probs, class_names, options: Options) -> None:
  """Pass 3: every frame with each face's smoothed box and the top class of its window nearest
  in time (among the windows containing the frame)."""
  centres = np.array([w.centre_s for w in windows])

  def current(k: int, t: float) -> np.ndarray | None:
    inside = [
      w.index for w in windows if w.start_s - 1e-6 <= t <= w.end_s + 1e-6 and (k, w.index) in probs
    ]
    if not inside:
      return None
    return probs[(k, min(inside, key=lambda i: abs(centres[i] - t)))]

  def overlays_at(t: float) -> list[render.Overlay]:
    out = []
    for k, tr in enumerate(tracks):
      p = current(k, t)
      colour = render.class_colour(int(np.argmax(p))) if p is not None else (90, 90, 90)
      label = render.summary_label(class_names, p)
      if len(tracks) > 1:
        label = f"face {k}: {label}"
      box = None
      if tr is not None and tr.seen_near(t, t, options.max_gap_s / 2):
        box = tr.box_at(t, options.smooth_s)
      elif tr is not None:
        label = f"face {k}: not in view" if len(tracks) > 1 else "no face"
        colour = (90, 90, 90)
      out.append(render.Overlay(box, label, colour))
    return out

  frames = ((rec.time, rec.rgb) for rec in reader.frames())
  render.write_video(path, render.frames_with_overlays(frames, overlays_at))


def _output_name(item: sources.InputItem, used: set[str]) -> str:
  base = item.path.stem if item.kind == sources.VIDEO else item.path.name
  base = re.sub(r"[^\w.-]+", "_", base).strip("._") or "input"
  name, n = base, 2
  while name in used:
    name = f"{base}_{n}"
    n += 1
  used.add(name)
  return name


def _table(rows: list[list[str]], max_cell: int = 80) -> str:
  # Long cells (error messages, printed in full above) are cut to keep the table readable.
  rows = [[c if len(c) <= max_cell else c[: max_cell - 3] + "..." for c in r] for r in rows]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


_PROG = "python -m dfer_clip_jax.predict"


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "checkpoint",
    None,
    "training workdir, checkpoint folder, or converted model export",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "which",
    "latest",
    "for a workdir: latest | best | a step number (default latest)",
    flag_values=fv,
  )
  flags.DEFINE_multi_string(
    "input",
    None,
    "video files, frame folders, folders of videos / frame folders, or "
    "globs (quoted, or expanded by the shell: `--input a.mp4 b.mp4`); "
    "may be repeated",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out", None, "output folder (one sub-folder per input)", required=True, flag_values=fv
  )
  crops.define_flags(fv)
  flags.DEFINE_boolean(
    "all_faces",
    False,
    "one track per face instead of the main (largest, most present) face",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "window_s", 3.0, "clip window length (s); shorter inputs are one clip", flag_values=fv
  )
  flags.DEFINE_float("stride_s", 1.0, "step between windows (s)", flag_values=fv)
  flags.DEFINE_float(
    "fps", 25.0, "frame rate of frame folders (videos carry their own timestamps)", flag_values=fv
  )
  flags.DEFINE_integer("batch_size", 8, "clips per model call", flag_values=fv)
  flags.DEFINE_boolean(
    "annotate",
    False,
    "also write annotated.mp4 with face boxes and the current top class",
    flag_values=fv,
  )


def parse_args(argv: Sequence[str] | None):
  """The flags; words after `--input` that are no flags (a shell-expanded glob) are inputs."""
  args, rest = cli.parse(
    _PROG, __doc__, _define, argv, positional=True, paths=("checkpoint", "input", "out")
  )
  args.input = list(args.input) + [cli.absolute(r) for r in rest]
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    options = Options(
      face=args.face,
      all_faces=args.all_faces,
      window_s=args.window_s,
      stride_s=args.stride_s,
      fps=args.fps,
      detect_fps=args.detect_fps,
      margin=args.margin,
      min_face=args.min_face,
      smooth_s=args.smooth_s,
      max_gap_s=args.max_gap_s,
      annotate=args.annotate,
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  found = sources.discover_inputs(args.input)
  for arg, why in found.problems:
    print(f"error: --input={arg}: {why}", file=sys.stderr)
  if not found.items:
    print("error: no input to predict on", file=sys.stderr)
    return 2
  try:
    model, spec, ref = restore.load_model(args.checkpoint, args.which)
    predictor = inference.Predictor(model, spec, batch_size=args.batch_size)
    detector = crops.options_from_flags(options).detector()
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    print(f"error: cannot load the model from {args.checkpoint}: {e}", file=sys.stderr)
    return 2
  model_info = {"checkpoint": ref.describe(), **inference.model_description(spec)}
  print(
    f"model: {ref.describe()}; {len(spec.class_names)} classes, {spec.num_frames} frames of "
    f"{spec.image_size}px per clip"
  )

  out_root = pathlib.Path(args.out)
  out_root.mkdir(parents=True, exist_ok=True)
  used: set[str] = set()
  records: list[dict[str, Any]] = [
    {"input": arg, "status": "error", "error": why, "output": None} for arg, why in found.problems
  ]
  rows = [["input", "status", "duration", "windows", "faces", "result"]]
  rows += [[arg, "error", "-", "-", "-", why] for arg, why in found.problems]
  for n, item in enumerate(found.items, 1):
    out_dir = out_root / _output_name(item, used)
    for stale in (PREDICTIONS, TIMELINE, ANNOTATED):  # from an earlier run into the same --out
      (out_dir / stale).unlink(missing_ok=True)
    started = time.time()
    print(f"[{n}/{len(found.items)}] {item.path}", flush=True)
    try:
      pred = predict_input(
        item, predictor, options, out_dir, detector=detector, model_info=model_info
      )
    except sources.InputError as e:
      print(f"  error: {e}", file=sys.stderr)
      records.append({"input": str(item.path), "status": "error", "error": str(e), "output": None})
      rows.append([str(item.path), "error", "-", "-", "-", str(e)])
      continue
    except Exception as e:  # pylint: disable=broad-exception-caught
      # A bug or an unforeseen file problem must not stop the other inputs; show where.
      traceback.print_exc()
      msg = f"{type(e).__name__}: {e}"
      records.append({"input": str(item.path), "status": "error", "error": msg, "output": None})
      rows.append([str(item.path), "error", "-", "-", "-", msg])
      continue
    tracks = pred["tracks"]
    result = "; ".join(_summary_text(t["summary"]) for t in tracks)
    faces = "-" if options.face == "none" else str(len(tracks))
    windows = len(tracks[0]["windows"])
    print(f"  {result} ({time.time() - started:.1f} s) -> {out_dir}", flush=True)
    records.append(
      {
        "input": str(item.path),
        "status": "ok",
        "error": None,
        "output": str(out_dir),
        "tracks": [t["summary"] for t in tracks],
      }
    )
    rows.append(
      [str(item.path), "ok", f"{pred['input']['duration_s']:.2f}s", str(windows), faces, result]
    )
  (out_root / SUMMARY).write_text(
    json.dumps({"format": FORMAT, "model": model_info, "inputs": records}, indent=1) + "\n",
    encoding="utf-8",
  )
  print()
  print(_table(rows))
  failed = sum(r["status"] != "ok" for r in records)
  print(f"\n{len(records) - failed} of {len(records)} inputs succeeded; outputs in {out_root}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
