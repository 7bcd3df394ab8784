"""grain input pipelines: clip source -> per-process batches of uint8 videos -> global arrays.

Flow (training)::

  source (random access: frame folders or packed TFDS records; data_api record interface)
    -> global plan: epoch e visits the clips in permutation perm(seed, e); global step k of
       the epoch takes perm[k G : (k + 1) G] (G = global batch = batch_size x
       process_count; the last N mod G clips of each epoch are dropped, as the reference's
       drop_last does)
    -> this process's rows: perm[k G + p B : k G + (p + 1) B] (B = batch_size per process,
       p = process_index), so each process reads only its own clips
    -> per clip: read the record, sample 16 frame indices (`sampling`), decode + augment
       (`augment`) with a generator seeded by (seed, epoch, clip index) only
    -> one call per batch (`loading.BatchLoader`) writing the clips into a preallocated
       batch array (no per-clip grain elements, no np.stack copy), made either by grain's
       thread prefetch in this process (`to_iter_dataset`, worker_count=0) or by the
       process's pool of light input worker processes (`workers.py`, worker_count > 0:
       started once, shared by training and every evaluation, videos through shared memory)
    -> `{'video': uint8 (B, T, H, W, 3), 'label': int32 (B,), 'index': int32 (B,),
         'mask': bool (B,)}` numpy batches
    -> `to_global_batch`: global `jax.Array`s sharded on the batch axis over the mesh;
       `prefetch_to_device` keeps the next batches' transfers in flight while a step runs.
  Pixels stay uint8 until the device: the model's `preprocess` makes them float there.

Every batch is a pure function of (seed, step), so the sequence is reproducible, identical for
any worker count, and the same global batches are produced for any process count with the
same global batch size. The iterator's state is just the next global step (JSON), so a
resumed run continues the exact sequence (`ClipBatchIterator.get_state` / `set_state`; it is
a `grain.DatasetIterator`, so grain's Orbax checkpoint handler can save it too).

Evaluation: clip j of the source sits at global position j; global step k holds positions
[k G, (k + 1) G) and process p the rows [k G + p B, k G + (p + 1) B). Positions >= N are
padding rows (zero video, label 0, index -1, mask False), so every clip is seen exactly once
across processes and every process yields the same number of batches (multi-host jit).

Bad clips (unreadable frames, missing folder, frame count differing from the record's):
  'error' (default): raise `loading.BadClipError` naming the clip (clip id, annotation file:line).
  'skip': training replaces the clip by the next readable clip of the epoch's permutation
  (deterministic, so resume and worker counts are unaffected; a clip may then appear twice
  in that epoch); evaluation sets the row's mask to False. Either way every skipped clip is
  logged and recorded in `dataset.skipped` (detected in the main process, also with worker
  processes, by comparing each batch with the plan). Validate the lists at start-up
  (`validate.validate_clips`) to find bad clips before training rather than during it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from dfer_clip_jax.data import augment as augment_lib
from dfer_clip_jax.data import loading
from dfer_clip_jax.data import workers as workers_lib

BAD_CLIP_POLICIES = ("error", "skip")

# First word of the train / val split's seed sequence (distinct from loading.py's streams).
_SPLIT_STREAM = 0x5350
# Element count standing for "forever" when num_epochs is None (kept below 2**63 so that
# index arithmetic stays within int64; 2**62 elements never run out).
_UNBOUNDED_ELEMENTS = 2**62


@dataclasses.dataclass(frozen=True)
class SkippedClip:
  """A clip left out under bad_clip_policy='skip'."""

  index: int  # Index of the clip in the source.
  clip_id: str
  origin: str | None  # 'annotation_file:line' when the source knows it.
  reason: str
  step: int  # Global step of the batch it was left out of.
  replaced_by: int | None  # Train: the clip used instead. Eval: None (the row is masked).


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")


class ClipDataset:
  """Per-process batches of one pipeline; iterate it to get a `ClipBatchIterator`.

  Attributes:
    batches: the per-process batches as a `grain.MapDataset` (random access by global step).
    skipped: every clip left out so far under bad_clip_policy='skip' (`SkippedClip`s).
    num_steps: number of batches (None: training without an epoch limit).
    steps_per_epoch: training steps per epoch (eval: `num_steps`).
  """

  def __init__(
    self,
    elements: loading.TrainElements | loading.EvalElements,
    *,
    kind: str,
    num_steps: int | None,
    fingerprint: dict[str, Any],
    worker_count: int,
    read_threads: int,
  ):
    self._elements = elements
    self.kind = kind
    self.num_steps = num_steps
    self.fingerprint = fingerprint
    self.worker_count = worker_count
    self.read_threads = read_threads
    self.batch_size = elements.batch_size
    self.steps_per_epoch = elements.steps_per_epoch if kind == "train" else num_steps
    self.skipped: list[SkippedClip] = []
    total = num_steps if num_steps is not None else _UNBOUNDED_ELEMENTS // self.batch_size
    # step -> batch; also what the input worker processes run.
    self.batch_loader = loading.BatchLoader(elements)
    self.batches: grain.MapDataset = grain.MapDataset.range(total).map(self.batch_loader)

  def __len__(self) -> int:
    if self.num_steps is None:
      raise TypeError("this training dataset repeats forever (num_epochs=None): no length")
    return self.num_steps

  def __iter__(self) -> ClipBatchIterator:
    return ClipBatchIterator(self)

  def iter_from(self, step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches from global step `step` on.

    worker_count=0: grain's thread prefetch in this process (`read_threads` threads; JPEG
    decoding and resizing release the GIL). worker_count>0: the process's shared pool of light
    worker processes (`workers.py`), started once and kept across evaluations, with two
    batches in flight per worker.
    """
    if self.worker_count > 0:
      pool = workers_lib.shared_pool(self.worker_count)
      return workers_lib.PoolBatches(
        pool, self.batch_loader, step, self.num_steps, depth=2 * self.worker_count
      )
    return self.batches.slice(slice(step, None)).to_iter_dataset(
      grain.ReadOptions(
        num_threads=self.read_threads, prefetch_buffer_size=max(1, self.read_threads)
      )
    )

  def record_skips(self, step: int, batch: dict[str, np.ndarray]) -> None:
    """Compares a batch with the plan; records (and logs) every clip that was left out."""
    epoch, planned = self._elements.planned(step)
    if self.kind == "train":
      left_out = np.flatnonzero(batch["index"] != planned)
    else:
      left_out = np.flatnonzero((planned >= 0) & ~batch["mask"])
    loader = self._elements.loader
    seed = getattr(self._elements, "seed", 0)
    for row in left_out:
      index = int(planned[row])
      clip_id, origin = loader.describe(index)
      skip = SkippedClip(
        index=index,
        clip_id=clip_id,
        origin=origin,
        reason=loader.failure(index, seed, epoch or 0),
        step=step,
        replaced_by=int(batch["index"][row]) if self.kind == "train" else None,
      )
      self.skipped.append(skip)
      logging.warning("skipped clip (%d so far): %s", len(self.skipped), skip)


class ClipBatchIterator(grain.DatasetIterator):
  """Iterator over a `ClipDataset` whose state is the next global step (JSON-serialisable).

  `get_state()` -> `{'step': int, 'fingerprint': {...}}`; `set_state(state)` continues from
  that step (the fingerprint must match the dataset's: same clips, seed, global batch,
  frames, image size, augmentation). Worker and process counts may differ on restore.
  """

  def __init__(self, dataset: ClipDataset, step: int = 0):
    super().__init__()
    self._dataset = dataset
    self._step = step
    self._it = None

  @property
  def step(self) -> int:
    """Global step of the next batch."""
    return self._step

  def _inner(self):
    if self._it is None:
      self._it = iter(self._dataset.iter_from(self._step))
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    if self._dataset.num_steps is not None and self._step >= self._dataset.num_steps:
      self.close()  # Stops worker processes now rather than at garbage collection.
      raise StopIteration
    try:
      batch = next(self._inner())
    except BaseException:
      self.close()  # Stops the worker processes of a failed pipeline now.
      raise
    self._dataset.record_skips(self._step, batch)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "fingerprint": dict(self._dataset.fingerprint)}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("fingerprint", {})
    ours = self._dataset.fingerprint
    diff = {
      k: (saved.get(k), ours.get(k)) for k in set(saved) | set(ours) if saved.get(k) != ours.get(k)
    }
    if diff:
      hint = ""
      if "fast_decode" in diff and diff["fast_decode"][0] is not None:
        # The default decode path changed (exact PIL -> OpenCV): runs started before resume
        # with the path they were started with.
        hint = f"; to continue this run, add --config.data.fast_decode={diff['fast_decode'][0]}"
      raise ValueError(
        "the saved data iterator state belongs to a different pipeline: "
        + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        + hint
      )
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    self.close()
    self._closed = False
    self._step = step

  def start_prefetch(self) -> None:
    inner = self._inner()
    if hasattr(inner, "start_prefetch"):
      inner.start_prefetch()

  def close(self) -> None:
    if self._it is not None:
      if hasattr(self._it, "close"):
        self._it.close()
      self._it = None
    self._closed = True


def _check_common(
  source, batch_size, num_frames, image_size, worker_count, read_threads, bad_clip_policy
) -> int:
  num_clips = len(source)
  if num_clips == 0:
    raise ValueError("the clip source is empty")
  for name, value in (
    ("batch_size", batch_size),
    ("num_frames", num_frames),
    ("image_size", image_size),
  ):
    if value < 1:
      raise ValueError(f"{name} must be positive, got {value}")
  if worker_count < 0 or read_threads < 0:
    raise ValueError(
      f"worker_count and read_threads must be >= 0, got {worker_count} and {read_threads}"
    )
  if bad_clip_policy not in BAD_CLIP_POLICIES:
    raise ValueError(f"bad_clip_policy must be one of {BAD_CLIP_POLICIES}, got {bad_clip_policy!r}")
  return num_clips


def make_train_dataset(
  source,
  *,
  seed: int,
  num_frames: int,
  image_size: int,
  augmentation: augment_lib.Augmentation,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  bad_clip_policy: str = "error",
  num_epochs: int | None = None,
  fast_decode: bool = False,
  read_threads: int = 2,
) -> ClipDataset:
  """The training pipeline (see the module docstring).

  Args:
    source: random-access clip source (data_api record interface).
    seed: seeds the per-epoch shuffle and every clip's sampling / augmentation.
    num_frames: frames per clip (temporal segments; 16 in the paper).
    image_size: output height and width (224 in the paper).
    augmentation: frame sampling and spatial ops of the train clips.
    batch_size: clips per batch *per process*; the global batch is
      batch_size x process_count.
    process_index, process_count: this process and the number of processes
      (`jax.process_index()`, `jax.process_count()`).
    worker_count: input worker processes (`workers.py`; 0: decode in threads of this process).
    bad_clip_policy: 'error' or 'skip' (see the module docstring).
    num_epochs: stop after this many epochs; None repeats forever.
    fast_decode: reduced-scale JPEG decoding (`augment.load_train_clip`); changes pixels
      slightly, off for the reference behaviour.
    read_threads: threads building batches in each process (main or worker).

  Returns:
    A `ClipDataset`; `iter()` gives batches `{'video': uint8 (B, T, H, W, 3),
    'label': int32 (B,), 'index': int32 (B,), 'mask': bool (B,) all True}`.
  """
  num_clips = _check_common(
    source, batch_size, num_frames, image_size, worker_count, read_threads, bad_clip_policy
  )
  _check_process(process_index, process_count)
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  global_batch = batch_size * process_count
  spe = loading.steps_per_epoch(num_clips, global_batch)
  if spe == 0:
    raise ValueError(
      f"{num_clips} clips do not fill one global batch of {global_batch} "
      f"({batch_size} per process x {process_count} processes)"
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  loader = loading.ClipLoader(
    source,
    num_frames=num_frames,
    image_size=image_size,
    fast_decode=fast_decode,
    augmentation=augmentation,
  )
  elements = loading.TrainElements(
    loader,
    num_clips=num_clips,
    seed=seed,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    bad_clip_policy=bad_clip_policy,
  )
  fingerprint = {
    "kind": "train",
    "num_clips": num_clips,
    "global_batch": global_batch,
    "seed": seed,
    "num_frames": num_frames,
    "image_size": image_size,
    "fast_decode": fast_decode,
    **augmentation.fingerprint(),
  }
  return ClipDataset(
    elements,
    kind="train",
    num_steps=None if num_epochs is None else num_epochs * spe,
    fingerprint=fingerprint,
    worker_count=worker_count,
    read_threads=read_threads,
  )


def make_eval_dataset(
  source,
  *,
  batch_size: int,
  num_frames: int,
  image_size: int,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  bad_clip_policy: str = "error",
  fast_decode: bool = False,
  read_threads: int = 2,
) -> ClipDataset:
  """The evaluation pipeline: every clip exactly once over all processes, in order.

  Each process yields `ceil(N / (batch_size x process_count))` batches; rows past the last
  clip are padding with `mask=False` and `index=-1` (never count them). Under
  bad_clip_policy='skip' an unreadable clip's row also gets `mask=False` and is recorded in
  `dataset.skipped`. Arguments as in `make_train_dataset`.
  """
  num_clips = _check_common(
    source, batch_size, num_frames, image_size, worker_count, read_threads, bad_clip_policy
  )
  _check_process(process_index, process_count)
  loader = loading.ClipLoader(
    source, num_frames=num_frames, image_size=image_size, fast_decode=fast_decode, augmentation=None
  )
  elements = loading.EvalElements(
    loader,
    num_clips=num_clips,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    bad_clip_policy=bad_clip_policy,
  )
  fingerprint = {
    "kind": "eval",
    "num_clips": num_clips,
    "global_batch": elements.global_batch,
    "num_frames": num_frames,
    "image_size": image_size,
    "fast_decode": fast_decode,
  }
  return ClipDataset(
    elements,
    kind="eval",
    num_steps=elements.num_steps,
    fingerprint=fingerprint,
    worker_count=worker_count,
    read_threads=read_threads,
  )


def to_global_batch(
  batch: dict[str, np.ndarray], mesh, batch_axes: Sequence[str] = ("data", "fsdp")
) -> dict[str, Any]:
  """Process-local numpy batch -> global `jax.Array`s sharded on the leading axis.

  Args:
    batch: this process's rows (every leaf has the per-process batch as leading axis).
    mesh: the `jax.sharding.Mesh`.
    batch_axes: mesh axes the batch is split over; axes absent from the mesh are ignored.

  Returns:
    The same keys, as global arrays of leading size batch_size x (number of processes
    holding distinct rows), with `NamedSharding(mesh, P(batch_axes))`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"none of the batch axes {tuple(batch_axes)} is in the mesh {mesh.axis_names}")
  shards = math.prod(mesh.shape[a] for a in axes)
  sharding = NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    rows = value.shape[0] * jax.process_count()
    if rows % shards:
      raise ValueError(
        f"batch[{key!r}] has {value.shape[0]} rows per process ({rows} in all), which do "
        f"not split over the {shards} shards of mesh axes {axes}"
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def prefetch_to_device(
  batches: Iterator[dict[str, np.ndarray]],
  mesh,
  size: int = 2,
  batch_axes: Sequence[str] = ("data", "fsdp"),
) -> Iterator[dict[str, Any]]:
  """Yields `to_global_batch(b)` for each batch of `batches`, with the `size` batches after the
  yielded one already handed to the devices: their host-to-device copies (asynchronous) run
  while earlier steps compute, so a slow batch on the host does not leave the accelerator idle.
  `size=0` transfers each batch when it is asked for.

  The iterator underneath runs `size` batches ahead of what was yielded: checkpoint its state
  with `iterator_state_at(it, step)`, not `it.get_state()`.
  """
  if size < 0:
    raise ValueError(f"prefetch size must be >= 0, got {size}")
  if size == 0:
    for batch in batches:
      yield to_global_batch(batch, mesh, batch_axes)
    return
  queue: collections.deque = collections.deque(
    to_global_batch(b, mesh, batch_axes) for b in itertools.islice(batches, size)
  )
  while queue:
    current = queue.popleft()
    queue.extend(to_global_batch(b, mesh, batch_axes) for b in itertools.islice(batches, 1))
    yield current


def iterator_state_at(it: ClipBatchIterator, step: int) -> dict[str, Any]:
  """The state of `it` as if its next batch were global step `step` (every batch is a pure
  function of (seed, step), so this is exact even when `it` has run ahead for prefetching)."""
  if step > it.step:
    raise ValueError(f"the iterator is at step {it.step}, behind the requested {step}")
  return {**it.get_state(), "step": int(step)}


def split_train_val(
  annotations_or_num_clips, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split of a training list into train / validation indices.

  Stratified by label: each class contributes `round(val_fraction x its count)` clips to
  validation, at least one when the class has two or more clips and val_fraction > 0 (so
  every class counts in the validation UAR), and always keeps at least one for training.

  Args:
    annotations_or_num_clips: `ClipAnnotation`s, a source with a `labels` attribute, a
      sequence of int labels, or a clip count (then the split is not stratified).
    val_fraction: in [0, 1).
    seed: the split's seed.

  Returns:
    `(train_indices, val_indices)`, sorted int64 arrays partitioning range(num_clips).
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  data = annotations_or_num_clips
  if isinstance(data, (int, np.integer)):
    labels = np.zeros(int(data), np.int64)
  elif hasattr(data, "labels"):
    labels = np.asarray(list(data.labels), np.int64)
  else:
    labels = np.asarray([getattr(x, "label", x) for x in data], np.int64)
  rng = np.random.default_rng([_SPLIT_STREAM, seed])
  val = []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    n_val = int(round(val_fraction * len(members)))
    if val_fraction > 0 and len(members) >= 2:
      n_val = min(max(n_val, 1), len(members) - 1)
    val.append(members[:n_val])
  val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
  train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
  return train_idx.astype(np.int64), val_idx.astype(np.int64)


def clip_id(source, index: int) -> str:
  """Clip `index`'s id, from the annotations when the source has them (no folder listing)."""
  annotations = getattr(source, "annotations", None)
  if annotations is not None:
    return annotations[index].clip_id
  return str(source[index]["clip_id"])
