"""Clip windows over a video's time line, and the frames each window samples.

A video no longer than one window is one clip over its whole length; a longer one gets windows
of `window_s` every `stride_s`, the last one ending at the video's end, so that the windows
cover the whole video. Each window's `num_frames` frames are sampled like the reference's test
sampler, but by time, so that variable frame rates are handled:

* frames at a constant rate (gaps within 10% of their median): the window's frames are sampled
  exactly as the test sampler samples a dataset clip made of them (`index_i = int(tick / 2 +
  tick * i)`, `tick = n / num_frames`, edge padding when n <= num_frames). A short video is one
  window holding all its frames, so it gets the reference's test indices;
* at a variable rate: the window is cut into `num_frames` equal time segments and each
  segment's middle instant takes the frame shown at that instant (the same rule measured in
  time instead of frames; with n <= num_frames the frames are edge-padded as above).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfer_clip_jax.data import sampling

# Times within a microsecond are the same instant (time bases round presentation times).
_TOL_S = 1e-6


@dataclasses.dataclass(frozen=True)
class Window:
  index: int
  start_s: float
  end_s: float

  @property
  def centre_s(self) -> float:
    return 0.5 * (self.start_s + self.end_s)


def make_windows(duration_s: float, window_s: float, stride_s: float) -> list[Window]:
  """Windows covering [0, duration_s]: one when the video fits in a window, else a sliding
  series whose last window ends at `duration_s`."""
  if window_s <= 0 or stride_s <= 0:
    raise ValueError(f"window_s and stride_s must be positive, got {window_s} and {stride_s}")
  if duration_s <= 0:
    raise ValueError(f"the duration must be positive, got {duration_s}")
  if duration_s <= window_s + _TOL_S:
    return [Window(0, 0.0, float(duration_s))]
  starts = []
  k = 0
  while k * stride_s + window_s < duration_s - _TOL_S:
    starts.append(k * stride_s)  # multiples, not a running sum: no drift over long videos
    k += 1
  last = duration_s - window_s
  if not starts or last - starts[-1] > _TOL_S:
    starts.append(last)
  return [Window(i, float(s), float(s + window_s)) for i, s in enumerate(starts)]


def is_constant_rate(times: np.ndarray) -> bool:
  """Whether consecutive frame times are evenly spaced (every gap within 10% of the median:
  time-base rounding passes, a dropped frame or a rate change does not)."""
  gaps = np.diff(np.asarray(times, np.float64))
  if len(gaps) == 0:
    return True
  step = float(np.median(gaps))
  return step > 0 and bool(np.all(np.abs(gaps - step) <= 0.1 * step))


def sample_frames(times: np.ndarray, start_s: float, end_s: float, num_frames: int) -> np.ndarray:
  """Indices (into `times`, ascending presentation times from 0) of a window's clip frames.

  Returns:
    (num_frames,) int64 indices, non-decreasing.
  """
  times = np.asarray(times, np.float64)
  if times.ndim != 1 or len(times) == 0:
    raise ValueError(f"expected a non-empty 1-D array of frame times, got shape {times.shape}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  inside = np.nonzero((times >= start_s - _TOL_S) & (times < end_s - _TOL_S))[0]
  if len(inside) == 0:
    # A gap in a variable-rate video: the frame on screen at the window's middle.
    k = int(np.searchsorted(times, 0.5 * (start_s + end_s) + _TOL_S, side="right")) - 1
    return np.full((num_frames,), max(k, 0), np.int64)
  if len(inside) <= num_frames or is_constant_rate(times[inside]):
    return inside[sampling.test_indices(len(inside), num_frames)]
  segment = (end_s - start_s) / num_frames
  instants = start_s + segment * (np.arange(num_frames) + 0.5)
  k = np.searchsorted(times, instants + _TOL_S, side="right") - 1
  return np.clip(k, inside[0], inside[-1]).astype(np.int64)
