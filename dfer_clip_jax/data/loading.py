"""Loading one batch of clips: pure functions of (seed, step), and the sources they read.

This is the part of the input pipeline that runs wherever batches are made: in the training
process's threads or in the input worker processes (`workers.py`). It imports only numpy,
PIL / OpenCV and the project's light data modules -- never grain, jax or tensorflow_datasets
-- so that a worker process starts in a fraction of a second. `pipeline.py` builds the
datasets and iterators around it.

  ClipLoader      clip index -> (video uint8 (T, H, W, 3), label): sampling + decode + augment
  TrainElements   element of this process -> the clip of the global training plan
                  (epoch permutation, bad-clip replacement)
  EvalElements    element -> the clip of the evaluation plan (or a padding row)
  BatchLoader     global step -> this process's batch, written row by row into one array
  SubsetSource, ConcatSource, RepeatSource: sources made of other sources
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from dfer_clip_jax.data import augment as augment_lib
from dfer_clip_jax.data import sampling

# Distinct first words of the seed sequences, so that the shuffle and the per-clip draws never
# share a random stream (the train / val split has its own, in pipeline.py).
_SHUFFLE_STREAM = 0x5348
_CLIP_STREAM = 0x434C


class BadClipError(RuntimeError):
  """A clip cannot be loaded; names the clip, its annotation line when known and why."""


def steps_per_epoch(num_clips: int, global_batch: int) -> int:
  """Training steps per epoch: full global batches only (the partial one is dropped)."""
  if global_batch < 1:
    raise ValueError(f"global_batch must be positive, got {global_batch}")
  return num_clips // global_batch


@functools.lru_cache(maxsize=4)
def _permutation(num_clips: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_clips)
  order.flags.writeable = False  # Shared by every caller through the cache.
  return order


def epoch_order(num_clips: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which training epoch `epoch` visits the clips (a permutation)."""
  return _permutation(num_clips, seed, epoch).copy()


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of one clip's sampling and augmentation draws in one epoch."""
  return np.random.default_rng([_CLIP_STREAM, seed, epoch, index])


class ClipLoader:
  """Turns a clip index into one pipeline element (picklable, for the input worker processes)."""

  def __init__(
    self,
    source,
    *,
    num_frames: int,
    image_size: int,
    fast_decode: bool,
    augmentation: augment_lib.Augmentation | None,
  ):
    self.source = source
    self.train = augmentation is not None  # train: sampled and augmented; eval: neither
    self.num_frames = num_frames
    self.image_size = image_size
    self.augmentation = augmentation
    self.fast_decode = fast_decode

  def describe(self, index: int) -> tuple[str, str | None]:
    """(clip_id, 'file:line' or None) of a clip, without touching its frames if possible."""
    annotations = getattr(self.source, "annotations", None)
    if annotations is not None and hasattr(annotations[index], "origin"):
      return annotations[index].clip_id, annotations[index].origin
    try:
      record = self.source[index]
    except Exception:  # The record itself may be what is broken.
      return f"#{index}", None
    return str(record.get("clip_id", f"#{index}")), record.get("origin")

  def video(
    self, index: int, seed: int, epoch: int, out: np.ndarray | None = None
  ) -> tuple[np.ndarray, int]:
    """Loads clip `index`: (video uint8 (T, H, W, 3), label), written into `out` where the
    decode path allows. Raises BadClipError."""
    try:
      record = self.source[index]
      frames, count = record["frames"], int(record["num_frames"])
      if len(frames) != count:
        raise ValueError(f"{len(frames)} frames found, the annotation says {count}")
      if self.train:
        rng = clip_rng(seed, epoch, index)
        indices = sampling.train_indices(
          count, rng, self.num_frames, fix_short=self.augmentation.fix_short_sampling
        )
        video = augment_lib.load_train_clip(
          frames,
          indices,
          rng,
          augmentation=self.augmentation,
          size=self.image_size,
          fast_decode=self.fast_decode,
          out=out,
        )
      else:
        indices = sampling.test_indices(count, self.num_frames)
        video = augment_lib.load_test_clip(
          frames, indices, size=self.image_size, fast_decode=self.fast_decode, out=out
        )
      return video, int(record["label"])
    except Exception as e:
      clip_id, origin = self.describe(index)
      where = f" ({origin})" if origin else ""
      raise BadClipError(f"clip {index} {clip_id!r}{where}: {type(e).__name__}: {e}") from e

  def failure(self, index: int, seed: int, epoch: int) -> str:
    """Why clip `index` cannot be loaded (re-runs the load; for skip reports)."""
    try:
      self.video(index, seed, epoch)
    except BadClipError as e:
      return str(e)
    return "loaded fine when retried (transient read error?)"


def _element(video: np.ndarray, label: int, index: int, mask: bool) -> dict[str, np.ndarray]:
  return {
    "video": video,
    "label": np.int32(label),
    "index": np.int32(index),
    "mask": np.bool_(mask),
  }


class BatchLoader:
  """Global step -> this process's batch, loaded row by row into one preallocated array.

  One call per batch (not per clip + a batching step): no per-element overhead and no
  np.stack copy of every (T, H, W, 3) video; each video is written once into its row of
  `out` (a new array, or a worker's shared-memory block). Rows are pure functions of
  (step, row).
  """

  def __init__(self, elements: TrainElements | EvalElements):
    self.elements = elements

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    """The batch video's shape (B, T, H, W, 3)."""
    el = self.elements
    size = el.loader.image_size
    return (el.batch_size, el.loader.num_frames, size, size, 3)

  def __call__(self, step: int, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rows = self.elements.batch_size
    video = np.empty(self.shape, np.uint8) if out is None else out  # (B, T, H, W, 3)
    if video.shape != self.shape or video.dtype != np.uint8:
      raise ValueError(f"out is {video.dtype} {video.shape}, expected uint8 {self.shape}")
    label = np.empty((rows,), np.int32)
    index = np.empty((rows,), np.int32)
    mask = np.empty((rows,), np.bool_)
    for row in range(rows):
      item = self.elements(step * rows + row, out=video[row])
      if item["video"].shape != video.shape[1:]:
        raise ValueError(
          f"clip {int(item['index'])} loaded as {item['video'].shape}, expected {video.shape[1:]}"
        )
      if not np.may_share_memory(item["video"], video):  # the fast paths wrote in place
        video[row] = item["video"]
      label[row], index[row], mask[row] = item["label"], item["index"], item["mask"]
    return {"video": video, "label": label, "index": index, "mask": mask}


class _Plan:
  """What both plans share: the clips, this process's share of each global batch, and what to
  do with a clip that cannot be loaded."""

  def __init__(
    self,
    loader: ClipLoader,
    *,
    num_clips: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    bad_clip_policy: str,
  ):
    self.loader = loader
    self.num_clips = num_clips
    self.batch_size = batch_size
    self.process_index = process_index
    self.global_batch = batch_size * process_count
    self.bad_clip_policy = bad_clip_policy


class TrainElements(_Plan):
  """Element e of this process -> the element of the global training plan."""

  def __init__(self, loader: ClipLoader, *, seed: int, **plan):
    super().__init__(loader, **plan)
    self.seed = seed
    self.steps_per_epoch = steps_per_epoch(self.num_clips, self.global_batch)

  def positions(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, positions in the epoch's permutation) of this process's rows of `step`."""
    epoch, k = divmod(step, self.steps_per_epoch)
    start = k * self.global_batch + self.process_index * self.batch_size
    return epoch, np.arange(start, start + self.batch_size)

  def planned(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, clip indices) of this process's rows of global step `step`."""
    epoch, pos = self.positions(step)
    return epoch, _permutation(self.num_clips, self.seed, epoch)[pos]

  def __call__(self, element: int, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    step, row = divmod(element, self.batch_size)
    epoch, pos = self.positions(step)
    pos = int(pos[row])
    order = _permutation(self.num_clips, self.seed, epoch)
    index = int(order[pos])
    try:
      video, label = self.loader.video(index, self.seed, epoch, out)
      return _element(video, label, index, True)
    except BadClipError as e:
      if self.bad_clip_policy == "error":
        raise
      logging.warning("skipping bad clip at step %d: %s", step, e)
    # Deterministic replacement: the next readable clip of this epoch's order.
    for k in range(1, self.num_clips):
      alt = int(order[(pos + k) % self.num_clips])
      try:
        video, label = self.loader.video(alt, self.seed, epoch, out)
      except BadClipError as e:
        logging.warning("skipping bad clip at step %d: %s", step, e)
        continue
      return _element(video, label, alt, True)
    raise BadClipError(f"no clip of the {self.num_clips} in the source can be loaded")


class EvalElements(_Plan):
  """Element e of this process -> a clip (or a padding row) of the evaluation plan."""

  def __init__(self, loader: ClipLoader, **plan):
    super().__init__(loader, **plan)
    self.num_steps = max(1, math.ceil(self.num_clips / self.global_batch))

  def planned(self, step: int) -> tuple[None, np.ndarray]:
    """(None, clip indices) of this process's rows of `step`; -1 marks padding rows."""
    start = step * self.global_batch + self.process_index * self.batch_size
    pos = np.arange(start, start + self.batch_size)
    return None, np.where(pos < self.num_clips, pos, -1)

  def _blank(self) -> np.ndarray:
    size = self.loader.image_size
    return np.zeros((self.loader.num_frames, size, size, 3), np.uint8)

  def __call__(self, element: int, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    step, row = divmod(element, self.batch_size)
    index = int(self.planned(step)[1][row])
    if index < 0:
      return _element(self._blank(), 0, -1, False)
    try:
      video, label = self.loader.video(index, 0, 0, out)
      return _element(video, label, index, True)
    except BadClipError as e:
      if self.bad_clip_policy == "error":
        raise
      logging.warning("masking out bad eval clip at step %d: %s", step, e)
      return _element(self._blank(), 0, index, False)


class SubsetSource:
  """The clips `indices` of a source, as a source (e.g. the train / val parts of a split).

  Records are the parent's; `index` in batches then refers to positions in this subset.
  """

  def __init__(self, source, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    n = len(source)
    if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
      raise ValueError(f"subset indices must lie in [0, {n})")
    parent = getattr(source, "annotations", None)
    if parent is not None:
      self.annotations = [parent[i] for i in self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]

  @property
  def labels(self) -> list[int]:
    if hasattr(self.source, "labels"):
      parent = self.source.labels
      return [int(parent[i]) for i in self.indices]
    return [int(self.source[int(i)]["label"]) for i in self.indices]


class ConcatSource:
  """Several sources as one, in order (e.g. the train and test splits of a packed dataset)."""

  def __init__(self, parts: Sequence[Any]):
    if not parts:
      raise ValueError("ConcatSource needs at least one source")
    self.parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range: {len(self)} clips")
    part = int(np.searchsorted(self._ends, index, side="right"))
    start = 0 if part == 0 else int(self._ends[part - 1])
    return self.parts[part][index - start]


class RepeatSource:
  """`base` repeated `times` times (so a short dataset yields enough batches to time)."""

  def __init__(self, base, times: int):
    if times < 1:
      raise ValueError(f"times must be positive, got {times}")
    self.base = base
    self.times = times

  def __len__(self) -> int:
    return len(self.base) * self.times

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.base[int(index) % len(self.base)]
