"""Temporal sampling against the reference's recorded indices (docs/method.md, Sampling)."""

import json

import numpy as np
import pytest

from dfer_clip_jax.data import sampling

_DRAWS = 3000  # Per clip length in the statistical checks: every frame is hit ~50+ times.


@pytest.fixture(scope="module")
def reference(reference_dir):
  with open(reference_dir / "sampling_and_tokens.json") as f:
    return json.load(f)["sampling"]


def _reference_support(nf: int, segments: int = 16) -> list[set[int]]:
  """Per segment, the frames the reference's train sampler can draw (docs/method.md, Sampling)."""
  avg = nf // segments
  if avg == 0:
    return [{min(i, nf - 1)} for i in range(segments)]
  return [set(range(i * avg, (i + 1) * avg)) for i in range(segments)]


def test_test_indices_equal_reference(reference):
  assert reference["num_segments"] == 16 and reference["duration"] == 1
  assert len(reference["test"]) > 60
  for nf, expected in reference["test"].items():
    got = sampling.test_indices(int(nf))
    assert got.dtype == np.int64 and got.shape == (16,)
    np.testing.assert_array_equal(got, expected, err_msg=f"nf={nf}")


def test_reference_train_draws_lie_in_our_support(reference):
  rng = np.random.default_rng(0)
  for entry in reference["train"]:
    nf = entry["num_frames"]
    support = [set() for _ in range(16)]
    for _ in range(200):
      for i, frame in enumerate(sampling.train_indices(nf, rng)):
        support[i].add(int(frame))
    for i, frame in enumerate(entry["indices"]):
      assert frame in support[i], f"nf={nf} seed={entry['np_seed']} segment {i}"


def test_train_support_and_uniformity_equal_reference(reference):
  rng = np.random.default_rng(1)
  for nf in sorted({e["num_frames"] for e in reference["train"]}):
    draws = np.stack([sampling.train_indices(nf, rng) for _ in range(_DRAWS)])  # (N, 16)
    for i, allowed in enumerate(_reference_support(nf)):
      values, counts = np.unique(draws[:, i], return_counts=True)
      assert set(values.tolist()) == allowed, f"nf={nf} segment {i}"
      # Uniform: every count within 6 binomial standard deviations of its expectation.
      p = 1.0 / len(allowed)
      sigma = np.sqrt(_DRAWS * p * (1 - p))
      assert np.all(np.abs(counts - _DRAWS * p) <= 6 * sigma + 1e-9), (nf, i, counts)


def test_reference_flaw_16_to_31_frames_takes_first_16():
  rng = np.random.default_rng(2)
  for nf in (16, 20, 31):
    for _ in range(20):
      np.testing.assert_array_equal(sampling.train_indices(nf, rng), np.arange(16))


@pytest.mark.parametrize("nf", [16, 17, 20, 31, 32, 47, 100])
def test_fix_short_segments_span_the_whole_clip(nf):
  rng = np.random.default_rng(3)
  draws = np.stack([sampling.train_indices(nf, rng, fix_short=True) for _ in range(_DRAWS)])
  for i in range(16):
    lo, hi = (i * nf) // 16, ((i + 1) * nf) // 16
    values = set(np.unique(draws[:, i]).tolist())
    assert values == set(range(lo, hi)), (nf, i, values)
  # Every frame of the clip can be drawn, the tail included.
  assert set(np.unique(draws).tolist()) == set(range(nf))


def test_short_clips_are_edge_padded_in_both_modes():
  rng = np.random.default_rng(4)
  for nf in (1, 5, 15):
    expected = np.minimum(np.arange(16), nf - 1)
    np.testing.assert_array_equal(sampling.test_indices(nf), expected)
    np.testing.assert_array_equal(sampling.train_indices(nf, rng), expected)
    np.testing.assert_array_equal(sampling.train_indices(nf, rng, fix_short=True), expected)


def test_other_segment_counts_and_bad_input():
  rng = np.random.default_rng(5)
  np.testing.assert_array_equal(sampling.test_indices(8, num_segments=4), [1, 3, 5, 7])
  idx = sampling.train_indices(9, rng, num_segments=4)
  assert idx.shape == (4,) and np.all(idx // 2 == np.arange(4))
  with pytest.raises(ValueError, match="at least one frame"):
    sampling.test_indices(0)
  with pytest.raises(ValueError, match="at least one frame"):
    sampling.train_indices(-3, rng)


def test_train_indices_deterministic_per_generator_seed():
  a = sampling.train_indices(300, np.random.default_rng(7))
  b = sampling.train_indices(300, np.random.default_rng(7))
  c = sampling.train_indices(300, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
