"""Frame decoding and the reference's spatial augmentation (docs/method.md, Augmentation)."""

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFile

from dfer_clip_jax.data import augment, datasets

_SIZE = 16
_DATASETS = ("dfew", "ferv39k", "mafw")


def _aug(dataset: str) -> augment.Augmentation:
  """The train augmentation of a registered dataset."""
  return augment.Augmentation(op=datasets.get(dataset).augment_op)


def _frame(seed: int, width: int = 24, height: int = 24) -> Image.Image:
  """A frame with no symmetry (gradient + noise), so crops and flips are visible."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1)
  noise = rng.integers(-30, 31, (height, width, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(im: Image.Image, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


class _ScriptedRng:
  """Stands in for np.random.Generator with a fixed script of unit-interval draws."""

  def __init__(self, units):
    self.units = list(units)

  def _next(self):
    return self.units.pop(0)

  def uniform(self, lo, hi):
    return lo + self._next() * (hi - lo)

  def random(self):
    return self._next()

  def integers(self, lo, hi):
    return lo + int(self._next() * (hi - lo))


def test_decode_paths_and_bytes_and_modes(tmp_path):
  frames = []
  for i, mode in enumerate(("RGB", "L", "RGBA", "CMYK", "I;16", "P")):
    im = (
      _frame(i)
      if mode != "I;16"
      else Image.frombytes("I;16", (24, 24), np.full((24, 24), 300 + i, np.uint16).tobytes())
    )
    im = im.convert(mode) if mode not in ("RGB", "I;16") else im
    path = tmp_path / f"{i}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}"
    im.save(path)
    frames.append(str(path))
  images = augment.decode_frames(frames, range(len(frames)))
  assert [im.mode for im in images] == ["RGB"] * len(frames)
  assert np.all(np.asarray(images[4]) == 255)  # 16-bit 300 clips to white, as PIL converts.
  from_bytes = augment.decode_frames([open(f, "rb").read() for f in frames], [0, 3, 3])
  np.testing.assert_array_equal(np.asarray(from_bytes[0]), np.asarray(images[0]))
  assert from_bytes[1] is from_bytes[2]  # A repeated index is decoded once.


def test_decode_errors_name_the_frame(tmp_path):
  good = _encode(_frame(0, 64, 64))
  cases = {
    "empty.jpg": b"",
    "truncated.jpg": good[: len(good) * 2 // 3],
    "garbage.jpg": bytes(range(256)) * 2,
  }
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(augment.FrameError, match=name):
      augment.decode_frames([str(tmp_path / name)], [0])
  with pytest.raises(augment.FrameError, match="image file is truncated"):
    augment.decode_frames([good[: len(good) * 2 // 3]], [0])
  with pytest.raises(augment.FrameError, match="out of range"):
    augment.decode_frames([good], [0, 1])


def test_truncated_images_policy_guard(monkeypatch):
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    augment.decode_frames([_encode(_frame(0))], [0])


@pytest.mark.parametrize("dataset", _DATASETS)
def test_one_draw_per_clip_shape_dtype_determinism(dataset):
  frame = _frame(1)
  images = [frame.copy() for _ in range(5)]  # Identical frames, distinct objects.
  outputs = []
  for seed in range(12):
    out = augment.train_transform(
      images, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    assert out.shape == (5, _SIZE, _SIZE, 3) and out.dtype == np.uint8
    for t in range(1, 5):  # Same crop / flip / brightness / angle on every frame.
      np.testing.assert_array_equal(out[t], out[0])
    again = augment.train_transform(
      images, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    np.testing.assert_array_equal(out, again)
    outputs.append(out[0])
  assert len({o.tobytes() for o in outputs}) == len(outputs)  # Seeds differ -> draws differ.


def test_crop_tries_fallback_and_swap_follow_spec():
  w, h = 40, 30
  area = w * h
  # Try 1: area fraction 1, aspect 4/3 -> 40x30 (fits only unswapped); swap draw 0.7 keeps
  # it -> corner draws 0.5, 0.5 are 0; flip draw 0.2 -> flip.
  p = augment.draw_train_params(
    w, h, _ScriptedRng([1.0, 1.0, 0.7, 0.5, 0.5, 0.2]), augmentation=_aug("mafw"), size=_SIZE
  )
  assert p.crop == (0, 0, 40, 30) and p.flip and p.fallback is None
  # Same try but swapped (0.3 < 0.5) -> 30x40 does not fit; try 2: fraction 0.25, aspect
  # 3/4 -> round(sqrt(300 * 0.75)) = 15, round(sqrt(400)) = 20; not swapped; corner
  # x in 0..25 -> 0.5 * 26 = 13, y in 0..10 -> 0.99 * 11 = 10.
  frac = (0.25 - 0.08) / 0.92
  p = augment.draw_train_params(
    w,
    h,
    _ScriptedRng([1.0, 1.0, 0.3, frac, 0.0, 0.9, 0.5, 0.99, 0.9]),
    augmentation=_aug("mafw"),
    size=_SIZE,
  )
  assert p.crop == (13, 10, 15, 20) and not p.flip
  assert round(math.sqrt(area * 0.25 * 0.75)) == 15
  # Ten failing tries (full area, aspect 4/3, swapped) -> fallback: short side 30 -> 16,
  # long side int(16 * 40 / 30) = 21, then a uniform 16x16 crop.
  script = [1.0, 1.0, 0.1] * 10 + [0.99, 0.0, 0.6]
  p = augment.draw_train_params(w, h, _ScriptedRng(script), augmentation=_aug("mafw"), size=_SIZE)
  assert p.crop is None and p.fallback == (21, 16, 5, 0) and not p.flip


def test_crop_statistics_with_a_real_generator():
  rng = np.random.default_rng(0)
  params = [
    augment.draw_train_params(64, 48, rng, augmentation=_aug("mafw"), size=_SIZE)
    for _ in range(2000)
  ]
  crops = np.array([p.crop for p in params if p.crop is not None])
  assert len(crops) > 1900  # The fallback is rare for a 4:3 frame.
  x1, y1, cw, ch = crops.T
  assert np.all(x1 + cw <= 64) and np.all(y1 + ch <= 48) and np.all(x1 >= 0)
  fraction = cw * ch / (64 * 48)
  assert fraction.min() > 0.06 and fraction.max() <= 1.0
  assert 0.45 < np.mean([p.flip for p in params]) < 0.55


def _reference_pixels(im, p, size):
  """The reference's per-frame pipeline, op by op on the full frame (the order of docs/method.md)."""
  if p.brightness is not None:
    im = ImageEnhance.Brightness(im).enhance(p.brightness)
  if p.angle is not None:
    im = im.rotate(p.angle, resample=Image.Resampling.NEAREST, expand=False)
  if p.crop is not None:
    x1, y1, w, h = p.crop
    im = im.crop((x1, y1, x1 + w, y1 + h)).resize((size, size), Image.Resampling.BILINEAR)
  else:
    rw, rh, x1, y1 = p.fallback
    im = im.resize((rw, rh), Image.Resampling.BILINEAR).crop((x1, y1, x1 + size, y1 + size))
  if p.flip:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(im)


@pytest.mark.parametrize("dataset", _DATASETS)
def test_pixels_equal_reference_ops(dataset):
  images = [_frame(2, 36, 28), _frame(3, 36, 28)]
  for seed in range(6):
    p = augment.draw_train_params(
      36, 28, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    assert (p.brightness is not None) == (dataset == "dfew")
    assert (p.angle is not None) == (dataset == "ferv39k")
    if p.brightness is not None:
      assert 0.5 <= p.brightness <= 1.5
    if p.angle is not None:
      assert -4 <= p.angle <= 4
    out = augment.train_transform(
      images, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    for t, im in enumerate(images):
      np.testing.assert_array_equal(out[t], _reference_pixels(im, p, _SIZE))
  # The fallback path too (an extreme aspect ratio makes every try fail).
  tall = [_frame(4, 2, 60)]
  for seed in range(3):
    p = augment.draw_train_params(
      2, 60, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    assert p.fallback is not None
    out = augment.train_transform(
      tall, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
    )
    np.testing.assert_array_equal(out[0], _reference_pixels(tall[0], p, _SIZE))


def test_brightness_and_rotation_change_pixels():
  white = [Image.new("RGB", (24, 24), (200, 200, 200))]
  rng = np.random.default_rng(0)
  means = {
    float(augment.train_transform(white, rng, augmentation=_aug("dfew"), size=_SIZE).mean())
    for _ in range(8)
  }
  assert len(means) > 4 and min(means) < 200 * 0.95 and max(means) <= 255
  # FERV39k: rotating a white frame leaves black corners whenever the crop reaches them.
  corners = [
    augment.train_transform(
      white, np.random.default_rng(s), augmentation=_aug("ferv39k"), size=_SIZE
    )
    for s in range(40)
  ]
  assert any((c == 0).any() for c in corners)
  assert all(
    not (
      augment.train_transform(
        white, np.random.default_rng(s), augmentation=_aug("mafw"), size=_SIZE
      )
      != 200
    ).any()
    for s in range(5)
  )


def test_test_transform_is_plain_bilinear_resize():
  images = [_frame(5, 30, 20), _frame(6, 30, 20)]
  out = augment.test_transform(images, size=_SIZE)
  assert out.shape == (2, _SIZE, _SIZE, 3) and out.dtype == np.uint8
  for t, im in enumerate(images):
    np.testing.assert_array_equal(
      out[t], np.asarray(im.resize((_SIZE, _SIZE), Image.Resampling.BILINEAR))
    )


def test_load_clip_matches_decode_plus_transform():
  frames = [_encode(_frame(i)) for i in range(6)]
  indices = np.array([0, 2, 4, 5, 5, 5])
  expected = augment.train_transform(
    augment.decode_frames(frames, indices),
    np.random.default_rng(3),
    augmentation=_aug("dfew"),
    size=_SIZE,
  )
  got = augment.load_train_clip(
    frames, indices, np.random.default_rng(3), augmentation=_aug("dfew"), size=_SIZE
  )
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(
    augment.load_test_clip(frames, indices, size=_SIZE),
    augment.test_transform(augment.decode_frames(frames, indices), size=_SIZE),
  )


# fast_decode's pixel tolerance vs the exact (PIL) path on smooth frames: OpenCV's filters
# differ from PIL's bilinear by a few levels; at this tiny output size a 1/2..1/8 reduced
# decode (crop box rounded to the reduced grid) adds up to ~6 levels on average. (At the
# paper's 224 px from 256 px synthetic faces: max 25, mean 0.2 levels.)
_FAST_MAX_DIFF = 16
_FAST_MEAN_DIFF = 6.5


def test_fast_decode_same_draws_close_pixels():
  y, x = np.mgrid[0:72, 0:88]
  smooth = np.stack([x * 255 // 88, y * 255 // 72, (x + y) * 255 // 160], -1)
  frames = [
    _encode(Image.fromarray(np.clip(smooth + 5 * i, 0, 255).astype(np.uint8))) for i in range(3)
  ]
  indices = [0, 1, 2, 2]
  reduced = 0
  for dataset in _DATASETS + ("synthetic",):
    for seed in range(6):
      rng_exact, rng_fast = np.random.default_rng(seed), np.random.default_rng(seed)
      exact = augment.load_train_clip(
        frames, indices, rng_exact, augmentation=_aug(dataset), size=_SIZE
      )
      fast = augment.load_train_clip(
        frames, indices, rng_fast, augmentation=_aug(dataset), size=_SIZE, fast_decode=True
      )
      # Same draws: both paths consumed exactly the same random numbers.
      assert rng_exact.bit_generator.state == rng_fast.bit_generator.state
      params = augment.draw_train_params(
        88, 72, np.random.default_rng(seed), augmentation=_aug(dataset), size=_SIZE
      )
      if params.crop is not None and params.angle is None:
        reduced += augment._reduction(params.crop[2], params.crop[3], _SIZE) > 1
      assert fast.shape == exact.shape == (4, _SIZE, _SIZE, 3) and fast.dtype == np.uint8
      np.testing.assert_array_equal(fast[2], fast[3])
      diff = np.abs(fast.astype(int) - exact.astype(int))
      assert diff.max() <= _FAST_MAX_DIFF, (dataset, seed, diff.max())
      assert diff.mean() < _FAST_MEAN_DIFF, (dataset, seed, diff.mean())
  assert reduced > 0  # Some crops took the reduced-decode branch.
  exact = augment.load_test_clip(frames, indices, size=_SIZE)
  fast = augment.load_test_clip(frames, indices, size=_SIZE, fast_decode=True)
  diff = np.abs(fast.astype(int) - exact.astype(int))
  assert diff.max() <= _FAST_MAX_DIFF and diff.mean() < _FAST_MEAN_DIFF
  # `out=` (a batch row): the fast paths write into it and return it, with the same pixels.
  for load, kw in (
    (augment.load_test_clip, {}),
    (augment.load_train_clip, dict(rng=np.random.default_rng(3), augmentation=_aug("dfew"))),
  ):
    ref = load(
      frames,
      indices,
      size=_SIZE,
      fast_decode=True,
      **{k: (np.random.default_rng(3) if k == "rng" else v) for k, v in kw.items()},
    )
    row = np.zeros((4, _SIZE, _SIZE, 3), np.uint8)
    got = load(frames, indices, size=_SIZE, fast_decode=True, out=row, **kw)
    assert got is row
    np.testing.assert_array_equal(row, ref)
  with pytest.raises(ValueError, match="out must be"):
    augment.load_test_clip(
      frames, indices, size=_SIZE, fast_decode=True, out=np.zeros((3, _SIZE, _SIZE, 3), np.uint8)
    )


def test_fast_decode_exact_parts():
  # Full-scale decode of an RGB JPEG is libjpeg-turbo in both libraries: identical.
  im = _frame(7, 40, 32)
  data = _encode(im)
  np.testing.assert_array_equal(
    augment._decode_array(data, 0, 1), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  )
  # The brightness table equals PIL's ImageEnhance.Brightness for every level.
  levels = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
  for factor in np.random.default_rng(0).uniform(0.5, 1.5, 20):
    np.testing.assert_array_equal(
      augment.brightness_lut(factor)[np.asarray(levels)],
      np.asarray(ImageEnhance.Brightness(levels).enhance(factor)),
    )
  # Non-JPEG frames and corrupt ones take PIL's strict path (same errors).
  png = _encode(im, "PNG")
  np.testing.assert_array_equal(augment._decode_array(png, 0, 1), np.asarray(im))
  with pytest.raises(augment.FrameError, match="image file is truncated"):
    augment.load_train_clip(
      [data[: len(data) * 2 // 3]],
      [0],
      np.random.default_rng(0),
      augmentation=_aug("mafw"),
      size=_SIZE,
      fast_decode=True,
    )
  with pytest.raises(augment.FrameError, match="differ in size"):
    augment.load_test_clip([data, _encode(_frame(8, 41, 32))], [0, 1], size=_SIZE, fast_decode=True)


def test_unknown_dataset_and_mixed_sizes():
  with pytest.raises(ValueError, match="unknown augmentation op"):
    augment.Augmentation(op="blur")
  with pytest.raises(ValueError, match="crop_min_area"):
    augment.Augmentation(crop_min_area=0.0)
  with pytest.raises(augment.FrameError, match="differ in size"):
    augment.train_transform(
      [_frame(0), _frame(1, 30, 24)],
      np.random.default_rng(0),
      augmentation=_aug("mafw"),
      size=_SIZE,
    )
