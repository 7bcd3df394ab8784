r"""Input-pipeline cost: our pipelines per path and worker count vs a reference-style loader.

    python -m dfer_clip_jax.benchmarks.input_pipeline --json=out.json [--workers=0,2]

Renders `--clips` synthetic clips of `--min_frames`..`--max_frames` frames at `--render_size`
(DFEW-like defaults: 224 px, 60-120 frames) into a temporary folder, packs them with the
`synthetic` tfds builder (`data.build`'s layout), and measures, for each source (`folders`,
`packed`), decode path (`exact`: pixel-identical to the reference; `fast`:
`data.fast_decode`), worker count and kind (`train`: sampling + the reference's augmentation;
`eval`: the test sampling), one whole pass over the clips from a cold start (the worker pool is
started inside the measurement, as a run's first epoch pays it):

  first_batch_s                 time to the first batch (worker start-up included)
  clips_per_s_after_first       throughput once the first batch is out
  clips_per_s_whole_pass        clips / whole pass time (start-up included)
  cpu_ms_per_clip               CPU of this process and its workers per clip, whole pass,
                                start-up included (the per-core figure: other load does not
                                change it much)
  cpu_ms_per_clip_steady        the same after the first batch
  main_cpu_ms_per_clip_steady   this process's share of it (with workers: copying batches out
                                of shared memory, the serial part of a host's pipeline)
  bytes_read_per_clip           bytes read from files (/proc rchar of this process and its
                                workers) after the first batch, per clip
  peak_rss_mb                   peak resident memory of this process (reset per measurement)
                                plus each worker's (shared-memory blocks count in both)
  projected_clips_per_s         {cores: cores x 1000 / cpu_ms_per_clip_steady}: what one host
                                reaches with that many cores kept busy (linear scaling)
  cores_for                     {clips/s: cores} needed for the rates in the README's Speed
                                section (B/32 bf16 training today and at its target)

and the same figures for a loader shaped like the reference's (`baseline`, in this process:
the folder listed with glob and sorted per clip, the reference's train sampler,
`Image.open(path).convert('RGB')` per frame, a random-sized crop + resize and a flip per frame
via PIL, a float32 CHW conversion per frame, batches stacked as a default collate does; run
first and last, `baseline` is their mean). `vs_baseline_per_cpu_s` of a measurement is the
baseline's CPU ms per clip over the measurement's, both for the whole pass. The headline keys:
`default_path` (the path `config_lib.base_config()` selects), `default_vs_baseline_per_cpu_s`
and `default_packed_vs_baseline_per_cpu_s` (train, in-process, frame folders / packed: the
median over `--pairs` rounds that alternate the baseline and both: on a machine whose speed
drifts, the ratio of runs seconds apart is the robust one), `worker_start_s` /
`worker_start_cpu_s` (one fresh worker, from launch to its first answer), `packed_bytes_per_clip_vs_frames` (packed train bytes read per clip over the bytes of
the frames the sampler uses), with `machine`, the date and the load average.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import pathlib
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import shared_memory
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from dfer_clip_jax import cli, config_lib
from dfer_clip_jax.data import annotations as annotations_lib
from dfer_clip_jax.data import (
  augment,
  loading,
  packed,
  pipeline,
  sampling,
  synthetic,
  tfds_builders,
)
from dfer_clip_jax.data import workers as workers_lib

NUM_SEGMENTS = 16
# Training clips/s of ViT-B/32 bf16 on one GPU, from the README's Speed section (today, target).
GPU_RATES = (839, 1500)
PROJECTED_CORES = (4, 8, 16, 32)


def _reference_train_indices(num_frames: int, rng: random.Random) -> list[int]:
  avg = num_frames // NUM_SEGMENTS
  if avg > 0:
    return [i * avg + rng.randrange(avg) for i in range(NUM_SEGMENTS)]
  return list(range(num_frames)) + [num_frames - 1] * (NUM_SEGMENTS - num_frames)


def _reference_crop(images: list[Image.Image], size: int, rng: random.Random) -> list[Image.Image]:
  """Random-sized crop with the reference's parameters, frame by frame via PIL."""
  width, height = images[0].size
  for _ in range(10):
    area = width * height * rng.uniform(0.08, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
    if rng.random() < 0.5:
      w, h = h, w
    if w <= width and h <= height:
      x1, y1 = rng.randint(0, width - w), rng.randint(0, height - h)
      return [
        im.crop((x1, y1, x1 + w, y1 + h)).resize((size, size), Image.BILINEAR) for im in images
      ]
  scale = size / min(width, height)
  out = []
  x1 = y1 = None
  for im in images:
    im = im.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    if x1 is None:
      x1, y1 = rng.randint(0, im.size[0] - size), rng.randint(0, im.size[1] - size)
    out.append(im.crop((x1, y1, x1 + size, y1 + size)))
  return out


def baseline_clips(
  clips: Sequence[annotations_lib.ClipAnnotation], size: int, batch_size: int, seed: int = 0
) -> Iterator[np.ndarray]:
  """Batches (B, T, 3, size, size) float32 the way the reference's loader makes them."""
  rng = random.Random(seed)
  batch = []
  i = 0
  while True:
    clip = clips[i % len(clips)]
    i += 1
    # The reference lists a clip's folder with glob and sorts the paths, per clip read.
    paths = sorted(glob.glob(os.path.join(os.fspath(clip.frame_dir), "*")))
    indices = _reference_train_indices(clip.num_frames, rng)
    images = [Image.open(paths[k]).convert("RGB") for k in indices]
    images = _reference_crop(images, size, rng)
    if rng.random() < 0.5:
      images = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    frames = [np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 for im in images]
    batch.append(np.stack(frames))
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []


# -- process accounting (Linux /proc; absent elsewhere, the figures are then None) --------------


def _proc_cpu_s(pid: int) -> float | None:
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _proc_rchar(pid: int) -> int | None:
  try:
    for line in pathlib.Path(f"/proc/{pid}/io").read_text().splitlines():
      if line.startswith("rchar:"):
        return int(line.split()[1])
  except OSError:
    pass
  return None


def _proc_peak_rss_mb(pid: int) -> float | None:
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> None:
  with contextlib.suppress(OSError):
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM


class _Usage:
  """CPU seconds and bytes read by this process and the given worker processes."""

  def __init__(self, pids: Sequence[int]):
    self.pids = list(pids)
    self.main_cpu = time.process_time()
    self.cpu = self.main_cpu + sum(_proc_cpu_s(p) or 0.0 for p in self.pids)
    rchar = [_proc_rchar(p) for p in [os.getpid(), *self.pids]]
    self.rchar = None if None in rchar else sum(rchar)


def _sample_frame_bytes(source, num_clips: int) -> float:
  """Mean bytes per clip of 16 sampled frames (the test sampler's: as many distinct frames as
  the train sampler's of a clip this long, without its randomness)."""
  total = 0
  for i in range(num_clips):
    record = source[i]
    indices = sampling.test_indices(int(record["num_frames"]), NUM_SEGMENTS)
    for k in sorted(set(int(x) for x in indices)):
      frame = record["frames"][k]
      total += len(frame) if isinstance(frame, bytes) else os.path.getsize(frame)
  return total / num_clips


def _measure(make_iter: Callable[[], Iterator[Any]], batch_size: int, num_batches: int, workers):
  """One whole pass of `num_batches` batches from a cold start (figures: module docstring).

  The steady figures start once every worker has delivered a batch (so no worker's start-up
  falls in them) and count the batches finished after that point (workers run ahead of the
  consumer: `PoolBatches.completed`). The in-process pipeline's prefetch (2 batches) is not
  visible; its steady CPU may be low by up to 2 / num_batches.
  """
  workers_lib.shutdown()
  _reset_peak_rss()
  start, usage0 = time.perf_counter(), _Usage([])
  it = make_iter()
  next(it)
  t_first = time.perf_counter()
  warm = max(1, workers)
  for _ in range(warm - 1):
    next(it)
  pids = workers_lib.shared_pool(workers).pids if workers else []
  finished = getattr(getattr(it, "_it", None), "completed", warm)
  mid = _Usage(pids)
  for _ in range(num_batches - warm):
    next(it)
  end, usage1 = time.perf_counter(), _Usage(pids)
  peak = [_proc_peak_rss_mb(p) for p in [os.getpid(), *pids]]
  close = getattr(it, "close", None)
  if close is not None:
    close()
  workers_lib.shutdown()
  clips = num_batches * batch_size
  steady_clips = max(1, num_batches - finished) * batch_size
  read = None
  if usage1.rchar is not None and mid.rchar is not None:
    read = (usage1.rchar - mid.rchar) / steady_clips
  return {
    "first_batch_s": t_first - start,
    "clips_per_s_after_first": (num_batches - 1) * batch_size / (end - t_first),
    "clips_per_s_whole_pass": clips / (end - start),
    # Workers were started inside the measurement: all their CPU time belongs to it.
    "cpu_ms_per_clip": 1000 * (usage1.cpu - usage0.cpu) / clips,
    "cpu_ms_per_clip_steady": 1000 * (usage1.cpu - mid.cpu) / steady_clips,
    # The main process's share: with workers, it only copies batches out of shared memory,
    # and bounds one host at 1000 / this clips/s however many workers run.
    "main_cpu_ms_per_clip_steady": 1000 * (usage1.main_cpu - mid.main_cpu) / steady_clips,
    "bytes_read_per_clip": read,
    "peak_rss_mb": None if None in peak else sum(peak),
    "peak_rss_mb_main": peak[0],
    "clips": clips,
  }


def _project(result: dict[str, Any]) -> None:
  per_core = 1000 / result["cpu_ms_per_clip_steady"]
  result["projected_clips_per_s"] = {str(n): n * per_core for n in PROJECTED_CORES}
  result["cores_for"] = {str(r): math.ceil(r / per_core) for r in GPU_RATES}


def worker_start(batch_loader) -> dict[str, float]:
  """Launch of one fresh worker to its first answer (one clip), wall and CPU seconds."""
  workers_lib.shutdown()
  start = time.perf_counter()
  pool = workers_lib.WorkerPool(1)
  block = shared_memory.SharedMemory(create=True, size=int(np.prod(batch_loader.shape)))
  try:
    pool.submit(batch_loader, 0, block.name, batch_loader.shape).result()
    wall = time.perf_counter() - start
    cpu = _proc_cpu_s(pool.pids[0])
  finally:
    pool.close()
    block.close()
    block.unlink()
  return {"worker_start_s": wall, "worker_start_cpu_s": cpu}


def _machine() -> dict[str, Any]:
  import grain  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  cpu = platform.processor()
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {
    "platform": platform.platform(),
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "cpu_affinity": affinity,
    "python": platform.python_version(),
    "numpy": np.__version__,
    "pillow": PIL.__version__,
    "grain": getattr(grain, "__version__", "unknown"),
    "tfds": tfds.__version__,
  }


def run(
  *,
  clips: int,
  workers: Sequence[int],
  image_size: int,
  render_size: int,
  min_frames: int,
  max_frames: int,
  batch_size: int,
  repeat: int,
  pairs: int = 3,
  work_dir: str | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs every measurement; returns the results dict (see the module docstring)."""
  tmp = None
  if work_dir is None:
    tmp = tempfile.mkdtemp(prefix="dfer_input_bench_")
    work_dir = tmp
  root = pathlib.Path(work_dir)
  load_before = list(os.getloadavg())  # other jobs on the machine skew wall-clock rates
  try:
    t0 = time.perf_counter()
    synthetic.generate(
      root / "synthetic",
      num_classes=7,
      num_clips=clips,
      seed=0,
      image_size=render_size,
      min_frames=min_frames,
      max_frames=max_frames,
      processes=None if clips >= 32 else 1,
      test_fraction=0.5,
      overwrite=True,
    )
    gen_s = time.perf_counter() - t0
    # Both lists of the synthetic split together: the benchmark reads every clip.
    anns = [
      a
      for split in ("train", "test")
      for a in annotations_lib.read_annotations(
        root / "synthetic" / f"{split}.txt", data_root=root / "synthetic"
      )
    ]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # tfds' progress bars
      name = tfds_builders.build(
        "synthetic",
        "classes7",
        manual_dir=root / "synthetic",
        data_dir=root / "tfds",
        num_workers=None if clips >= 32 else 1,
      )
    pack_s = time.perf_counter() - t0
    log(f"rendered {clips} clips at {render_size} px in {gen_s:.1f} s, packed in {pack_s:.1f} s")
    sources = {
      "folders": annotations_lib.FrameFolderSource(anns),
      "packed": loading.ConcatSource(
        [packed.packed_source(root / "tfds", name, s) for s in ("train", "test")]
      ),
    }
    num_batches = max(2, repeat * clips // batch_size)

    def dataset(kind, source_name, num_workers, fast_decode):
      # Exactly num_batches batches: no worker loads a batch that is not measured.
      source = loading.SubsetSource(
        loading.RepeatSource(sources[source_name], repeat + 1), range(num_batches * batch_size)
      )
      common = dict(
        num_frames=NUM_SEGMENTS,
        image_size=image_size,
        batch_size=batch_size,
        worker_count=num_workers,
        fast_decode=fast_decode,
      )
      if kind == "train":
        return pipeline.make_train_dataset(
          source, seed=0, augmentation=augment.Augmentation(), num_epochs=1, **common
        )
      return pipeline.make_eval_dataset(source, **common)

    results: dict[str, Any] = {"measurements": {}}

    def baseline() -> dict[str, Any]:
      return _measure(
        lambda: baseline_clips(anns, image_size, batch_size), batch_size, num_batches, 0
      )

    # The baseline runs first and last: the machine's speed drifts over a run (a shared VM),
    # and the ratios use the mean of the two.
    first_base = baseline()
    for kind in ("train", "eval"):
      for source_name in sources:
        for path, fast in (("exact", False), ("fast", True)):
          for w in workers:
            key = f"{kind}_{source_name}_{path}_workers{w}"
            r = _measure(
              lambda: iter(dataset(kind, source_name, w, fast)),  # noqa: B023
              batch_size,
              num_batches,
              w,
            )
            _project(r)
            results["measurements"][key] = r
    last_base = baseline()
    base = {
      k: (first_base[k] + last_base[k]) / 2 if isinstance(first_base[k], float) else first_base[k]
      for k in first_base
    }
    _project(base)
    results["baseline"] = base
    results["baseline_runs"] = [first_base, last_base]
    log(
      f"baseline (reference-shaped, 1 process): {base['clips_per_s_after_first']:.1f} clips/s, "
      f"{base['cpu_ms_per_clip']:.1f} CPU ms/clip (first and last run: "
      f"{first_base['cpu_ms_per_clip']:.1f}, {last_base['cpu_ms_per_clip']:.1f})"
    )
    for key, r in results["measurements"].items():
      # Whole-pass CPU, start-up included: the conservative per-core comparison.
      r["vs_baseline_per_cpu_s"] = base["cpu_ms_per_clip"] / r["cpu_ms_per_clip"]
      log(
        f"{key:32s} first batch {r['first_batch_s']:.2f} s, "
        f"{r['clips_per_s_after_first']:6.1f} clips/s after it, "
        f"{r['clips_per_s_whole_pass']:6.1f} whole pass, "
        f"{r['cpu_ms_per_clip']:5.1f} CPU ms/clip "
        f"({r['vs_baseline_per_cpu_s']:.2f}x), "
        f"{(r['bytes_read_per_clip'] or 0) / 1e3:7.1f} kB/clip, "
        f"peak {r['peak_rss_mb'] or 0:.0f} MB"
      )
    one_clip = pipeline.make_eval_dataset(
      sources["folders"], batch_size=1, num_frames=1, image_size=image_size
    )
    results.update(worker_start(one_clip.batch_loader))
    log(f"one worker: {results['worker_start_s']:.2f} s from launch to its first clip")
    default_path = "fast" if config_lib.base_config().data.fast_decode else "exact"
    m = results["measurements"]
    # The headline ratio from alternating runs (baseline, folders, packed; `pairs` times):
    # each ratio compares runs seconds apart, and the median ignores a drifting machine.
    rounds = []
    for _ in range(pairs):
      row = {"baseline": baseline()["cpu_ms_per_clip"]}
      for source_name in sources:
        r = _measure(
          lambda: iter(dataset("train", source_name, 0, default_path == "fast")),  # noqa: B023
          batch_size,
          num_batches,
          0,
        )
        row[source_name] = r["cpu_ms_per_clip"]
      rounds.append(row)
    ratios = {
      source_name: float(np.median([row["baseline"] / row[source_name] for row in rounds]))
      for source_name in sources
    }
    log(
      f"default path ({default_path}), train, in-process, median of {pairs} alternating "
      f"rounds: folders {ratios['folders']:.2f}x, packed {ratios['packed']:.2f}x the baseline "
      "per CPU-second"
    )
    frames_bytes = _sample_frame_bytes(sources["packed"], clips)
    packed_read = m[f"train_packed_{default_path}_workers0"]["bytes_read_per_clip"]
    results.update(
      {
        "default_path": default_path,
        "default_vs_baseline_per_cpu_s": ratios["folders"],
        "default_packed_vs_baseline_per_cpu_s": ratios["packed"],
        "default_rounds_cpu_ms_per_clip": rounds,
        "sampled_frame_bytes_per_clip": frames_bytes,
        "packed_bytes_per_clip_vs_frames": (
          None if packed_read is None else packed_read / frames_bytes
        ),
        "cores": os.cpu_count(),
        "workers": list(workers),
        "image_size": image_size,
        "render_size": render_size,
        "frames_per_clip": [min_frames, max_frames],
        "num_frames": NUM_SEGMENTS,
        "batch_size": batch_size,
        "clips": clips,
        "batches_per_measurement": num_batches,
        "generate_seconds": gen_s,
        "pack_seconds": pack_s,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_before_after": [load_before, list(os.getloadavg())],
      }
    )
    return results
  finally:
    workers_lib.shutdown()
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


_PROG = "python -m dfer_clip_jax.benchmarks.input_pipeline"


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("json", None, "where to write the results", required=True, flag_values=fv)
  flags.DEFINE_integer("clips", 64, "distinct synthetic clips", flag_values=fv)
  flags.DEFINE_string("workers", "0,2", "comma-separated worker counts", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "pipeline output size", flag_values=fv)
  flags.DEFINE_integer("render_size", 224, "synthetic frame size", flag_values=fv)
  flags.DEFINE_integer("min_frames", 60, "shortest synthetic clip", flag_values=fv)
  flags.DEFINE_integer("max_frames", 120, "longest synthetic clip", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "clips per batch", flag_values=fv)
  flags.DEFINE_integer("repeat", 4, "passes over the clips per measurement", flag_values=fv)
  flags.DEFINE_integer(
    "pairs", 5, "alternating baseline / default-path rounds for the headline", flag_values=fv
  )
  flags.DEFINE_string("work_dir", None, "keep the data here (default: temp)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(_PROG, __doc__, _define, argv, paths=("json", "work_dir"))
  workers = cli.int_list(_PROG, "workers", args.workers)
  if not workers or min(workers) < 0:
    cli.fail(_PROG, f"--workers needs non-negative counts, got {args.workers!r}")
  if args.clips < 14:
    cli.fail(_PROG, "--clips must be >= 14 (two per class)")
  if args.pairs < 1:
    cli.fail(_PROG, f"--pairs must be positive, got {args.pairs}")
  if not 1 <= args.min_frames <= args.max_frames:
    cli.fail(_PROG, "--min_frames must lie in [1, --max_frames]")
  results = run(
    clips=args.clips,
    workers=workers,
    image_size=args.image_size,
    render_size=args.render_size,
    min_frames=args.min_frames,
    max_frames=args.max_frames,
    batch_size=args.batch_size,
    repeat=args.repeat,
    pairs=args.pairs,
    work_dir=args.work_dir,
  )
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
  print(
    f"default path ({results['default_path']}, folders, in-process): "
    f"{results['default_vs_baseline_per_cpu_s']:.2f}x the reference-style loader per "
    f"CPU-second; a worker starts in {results['worker_start_s']:.2f} s -> {args.json}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
