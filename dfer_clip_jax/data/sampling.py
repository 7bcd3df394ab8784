"""Temporal sampling: which frames of a clip form its `num_segments` model frames
(docs/method.md, Sampling).

Train (reference): `avg = nf // S`; when `avg > 0`, frame i is `i * avg + U{0..avg-1}`
(one random frame per equal segment; the tail beyond `S * avg` is never used). When
`nf < S`: frames `0..nf-1`, then the last one repeated.

The reference flaw: for `S <= nf < 2S` (16..31 frames), `avg == 1` and training always takes
frames `0..S-1` while the test sampler spreads over the whole clip. `fix_short=True` instead
splits the whole clip into S segments `[floor(i nf / S), floor((i + 1) nf / S))` and draws one
frame uniformly inside each, for every `nf >= S` (so long clips use their tail too).

Test: for `nf > S`, `tick = nf / S` and frame i is `int(tick / 2 + tick * i)` (segment
centres); otherwise the same edge padding as train.
"""

import numpy as np

NUM_SEGMENTS = 16


def _check(num_frames: int, num_segments: int) -> None:
  if num_frames < 1:
    raise ValueError(f"a clip needs at least one frame, got num_frames={num_frames}")
  if num_segments < 1:
    raise ValueError(f"num_segments must be positive, got {num_segments}")


def _edge_padded(num_frames: int, num_segments: int) -> np.ndarray:
  # Frames 0..nf-1, then the last frame repeated (numpy's 'edge' padding in the reference).
  return np.minimum(np.arange(num_segments), num_frames - 1).astype(np.int64)


def test_indices(num_frames: int, num_segments: int = NUM_SEGMENTS) -> np.ndarray:
  """Deterministic frame indices of the reference's test sampler, shape (num_segments,)."""
  _check(num_frames, num_segments)
  if num_frames > num_segments:
    # Python float arithmetic, as in the reference (a list comprehension over floats).
    tick = num_frames / float(num_segments)
    return np.array([int(tick / 2.0 + tick * i) for i in range(num_segments)], np.int64)
  return _edge_padded(num_frames, num_segments)


test_indices.__test__ = False  # Not a pytest test, even when imported into a test module.


def train_indices(
  num_frames: int,
  rng: np.random.Generator,
  num_segments: int = NUM_SEGMENTS,
  fix_short: bool = False,
) -> np.ndarray:
  """Random frame indices of the train sampler, shape (num_segments,), non-decreasing.

  Args:
    num_frames: the clip's frame count.
    rng: the generator all randomness comes from.
    num_segments: frames per clip (16 in the reference).
    fix_short: segments over the whole clip for every `num_frames >= num_segments`
      (see the module docstring); False reproduces the reference.
  """
  _check(num_frames, num_segments)
  if num_frames < num_segments:
    return _edge_padded(num_frames, num_segments)
  segment = np.arange(num_segments, dtype=np.int64)
  if fix_short:
    starts = segment * num_frames // num_segments
    ends = (segment + 1) * num_frames // num_segments  # > starts since nf >= S.
    return rng.integers(starts, ends).astype(np.int64)
  avg = num_frames // num_segments
  return segment * avg + rng.integers(0, avg, size=num_segments)
