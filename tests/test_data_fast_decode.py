"""`data.fast_decode` at the resolution the README quotes (224 px from 256 px synthetic faces):
the mean and 99th-percentile pixel differences to the exact path, tight enough that a
half-pixel shift of the frame fails them."""

import io

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.data import augment, datasets, synthetic

SIZE = 224
# Measured: train crops mean 0.18-0.21 levels, 99th percentile 1; the whole-frame test resize
# mean 0.36, 99th percentile 2 (a few edge pixels differ more). A half-pixel shift: mean 1.7,
# 99th percentile 18.
TRAIN_MEAN, TEST_MEAN, P99 = 0.3, 0.5, 2


def _stats(a, b) -> tuple[float, float]:
  diff = np.abs(a.astype(int) - b.astype(int))
  return float(diff.mean()), float(np.percentile(diff, 99))


@pytest.fixture(scope="module")
def frames():
  clip = synthetic.render_clip(2, 6, np.random.default_rng(0), size=256)
  out = []
  for rgb in clip:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    out.append(buf.getvalue())
  return out


def test_fast_decode_is_close_at_224_px(frames):
  indices = list(range(len(frames)))
  for name in ("dfew", "ferv39k", "mafw"):
    augmentation = augment.Augmentation(op=datasets.get(name).augment_op)
    for seed in range(3):
      exact, fast = (
        augment.load_train_clip(
          frames,
          indices,
          np.random.default_rng(seed),
          augmentation=augmentation,
          size=SIZE,
          fast_decode=fast_decode,
        )
        for fast_decode in (False, True)
      )
      mean, p99 = _stats(fast, exact)
      assert mean <= TRAIN_MEAN and p99 <= P99, (name, seed, mean, p99)
  exact = augment.load_test_clip(frames, indices, size=SIZE)
  fast = augment.load_test_clip(frames, indices, size=SIZE, fast_decode=True)
  mean, p99 = _stats(fast, exact)
  assert mean <= TEST_MEAN and p99 <= P99, (mean, p99)
  # The bounds are tight enough: the exact frames moved by half a pixel fail both of them.
  shifted = (exact[:, :, 1:].astype(int) + exact[:, :, :-1]) // 2
  mean, p99 = _stats(shifted, exact[:, :, :-1])
  assert mean > 2 * TEST_MEAN and p99 > 4 * P99, (mean, p99)
