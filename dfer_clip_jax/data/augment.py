"""Frame decoding and spatial augmentation, as the reference computes them
(docs/method.md, Augmentation).

Train (`Augmentation`): one random draw per clip, applied to all its frames, in this order:
  1. DFEW: brightness factor ~ U(0.5, 1.5) (PIL `ImageEnhance.Brightness`).
     FERV39k: rotation angle ~ U(-4, 4) degrees (nearest, no expand, black corners).
     MAFW / synthetic: nothing.
  2. Random-sized crop: up to 10 tries of area fraction ~ U(0.08, 1), aspect ~ U(3/4, 4/3)
     (linear), `w = round(sqrt(A r))`, `h = round(sqrt(A / r))`, swap w and h with p 0.5; a
     try succeeds when the crop fits, its corner is then uniform; the crop is resized to
     `size x size` (bilinear). When all tries fail: resize the short side to `size`
     (bilinear), then a uniform `size x size` crop. Parameters come from the first frame.
  3. Horizontal flip with p 0.5.
Test: bilinear resize straight to `size x size` (aspect not kept).

Frames stay uint8 on the host: the output is a `(T, size, size, 3)` uint8 array, and
the model's `preprocess` is the one place where pixels become float32 (on the device).

Speed: every transform is one or two PIL calls per frame (PIL's C code releases the GIL),
repeated frames of short clips are decoded and transformed once, and the clip is written
into one preallocated array. `fast_decode=True` (the configs' default, `data.fast_decode`) swaps PIL
for OpenCV on the same random parameters (drawn from the full-size frame, in the same
order): `cv2.imdecode` (libjpeg-turbo; at 1/2, 1/4 or 1/8 scale when the crop still has at
least `size` pixels after it), the crop as a numpy slice, `cv2.resize` (area averaging when
shrinking, bilinear when enlarging) written straight into the clip's array, DFEW's
brightness as a uint8 lookup table equal to PIL's, the flip with `cv2.flip`. Pixels differ
slightly from the reference: OpenCV's bilinear / area filters are not PIL's bilinear
filter (PIL widens the filter when shrinking), and a reduced decode is libjpeg's DCT-domain
downscale with the crop box rounded to its pixel grid. The max / mean differences are
bounded in `tests/test_data_augment.py`. FERV39k's rotation stays PIL's (exact).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFile

# The dataset-specific train ops applied before the crop ("" = none; `datasets.Dataset`).
DATASET_OPS = ("", "brightness", "rotation")

_BRIGHTNESS_RANGE = (0.5, 1.5)
_ROTATION_DEGREES = 4.0
_CROP_TRIES = 10
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)

Frame = str | os.PathLike[str] | bytes


class FrameError(ValueError):
  """A frame cannot be decoded, or a clip's frames disagree in size."""


def _require_strict_truncation() -> None:
  # With this PIL global set, a truncated JPEG decodes "successfully" with grey rows at the
  # bottom: a corrupt clip would be trained on silently.
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
      "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other library?): truncated "
      "frames would be decoded silently as partly grey images. Set it back to False."
    )


def _frame_name(frame: Frame, index: int) -> str:
  return f"frame {index} ({len(frame)} encoded bytes)" if isinstance(frame, bytes) else str(frame)


def _open(frame: Frame, index: int) -> Image.Image:
  try:
    return Image.open(io.BytesIO(frame) if isinstance(frame, bytes) else frame)
  except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...).
    raise FrameError(f"cannot open {_frame_name(frame, index)}: {e}") from e


def _load_rgb(im: Image.Image, frame: Frame, index: int) -> Image.Image:
  # PIL closes a path frame's file after a successful load(); close it on failure too.
  try:
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")
  except Exception as e:
    im.close()
    raise FrameError(f"cannot decode {_frame_name(frame, index)}: {e}") from e


def _check_indices(num_frames: int, indices: Sequence[int]) -> None:
  if len(indices) == 0:
    raise ValueError("no frame indices to decode")
  bad = [int(i) for i in indices if not 0 <= int(i) < num_frames]
  if bad:
    raise FrameError(f"frame index {bad[0]} out of range: the clip has {num_frames} frames")


def decode_frames(frames: Sequence[Frame], indices: Sequence[int]) -> list[Image.Image]:
  """Decodes `frames[i]` for each i of `indices` into RGB PIL images (loaded in memory).

  A frame whose index repeats (edge-padded short clips) is decoded once and the same image
  object appears several times in the result. Non-RGB frames (grey, RGBA, CMYK, 16-bit, ...)
  are converted with `Image.convert('RGB')`, as the reference does.

  Raises:
    FrameError: a frame is unreadable, corrupt, empty or truncated (naming the file).
  """
  _require_strict_truncation()
  _check_indices(len(frames), indices)
  cache: dict[int, Image.Image] = {}
  for i in indices:
    i = int(i)
    if i not in cache:
      cache[i] = _load_rgb(_open(frames[i], i), frames[i], i)
  return [cache[int(i)] for i in indices]


@dataclasses.dataclass(frozen=True)
class TrainParams:
  """The random draw of one clip's train augmentation (pixel units of the full frame)."""

  brightness: float | None  # Brightness factor (DFEW), else None.
  angle: float | None  # Rotation angle in degrees (FERV39k), else None.
  crop: tuple[int, int, int, int] | None  # (x1, y1, w, h) of a successful crop try.
  fallback: tuple[int, int, int, int] | None  # (resized w, resized h, x1, y1) otherwise.
  flip: bool


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The train-time randomness of a clip: one value from the config to the loader.

  The resume fingerprint of the training pipeline is derived from its fields. The ops run in
  the order of `ops` (the dataset-specific op, the random-sized crop, the flip) from one
  `TrainParams` draw that both decode paths (PIL exact, OpenCV fast) apply.

  Attributes:
    op: the dataset-specific op before the crop: '' (none), 'brightness' (DFEW) or 'rotation'
      (FERV39k).
    crop_min_area: smallest area fraction of the random-sized crop (the reference's 0.08;
      larger values crop less aggressively, e.g. for models trained from scratch).
    fix_short_sampling: spread the train frames of 16..31-frame clips over the whole clip
      (`sampling.train_indices` fix_short); False is the reference.
  """

  op: str = ""
  crop_min_area: float = _CROP_AREA_RANGE[0]
  fix_short_sampling: bool = False

  def __post_init__(self):
    if self.op not in DATASET_OPS:
      raise ValueError(f"unknown augmentation op {self.op!r}: expected one of {DATASET_OPS}")
    if not 0.0 < self.crop_min_area <= 1.0:
      raise ValueError(f"crop_min_area must be in (0, 1], got {self.crop_min_area}")

  @property
  def ops(self) -> tuple[str, ...]:
    """The spatial ops in the order they run."""
    return tuple(o for o in (self.op, "random_sized_crop", "flip") if o)

  def fingerprint(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def draw_train_params(
  width: int,
  height: int,
  rng: np.random.Generator,
  *,
  augmentation: Augmentation,
  size: int,
) -> TrainParams:
  """Draws one clip's augmentation parameters for frames of `width x height` pixels."""
  crop_min_area = augmentation.crop_min_area
  brightness = angle = None
  if augmentation.op == "brightness":
    brightness = float(rng.uniform(*_BRIGHTNESS_RANGE))
  elif augmentation.op == "rotation":
    angle = float(rng.uniform(-_ROTATION_DEGREES, _ROTATION_DEGREES))
  crop = fallback = None
  area = width * height
  for _ in range(_CROP_TRIES):
    target_area = rng.uniform(crop_min_area, _CROP_AREA_RANGE[1]) * area
    aspect = rng.uniform(*_CROP_ASPECT_RANGE)
    # Python's round (half to even), as the reference computes it.
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if rng.random() < 0.5:
      w, h = h, w
    if w <= width and h <= height:
      x1 = int(rng.integers(0, width - w + 1))
      y1 = int(rng.integers(0, height - h + 1))
      crop = (x1, y1, w, h)
      break
  if crop is None:
    # torchvision Resize(int): short side to `size`, long side truncated.
    if width <= height:
      rw, rh = size, int(size * height / width)
    else:
      rw, rh = int(size * width / height), size
    fallback = (rw, rh, int(rng.integers(0, rw - size + 1)), int(rng.integers(0, rh - size + 1)))
  flip = bool(rng.random() < 0.5)
  return TrainParams(brightness=brightness, angle=angle, crop=crop, fallback=fallback, flip=flip)


def _brightness(im: Image.Image, factor: float | None) -> Image.Image:
  return im if factor is None else ImageEnhance.Brightness(im).enhance(factor)


def _flip(im: Image.Image, flip: bool) -> Image.Image:
  # PIL's transpose is a fast C copy; flipping the stacked numpy array (a strided copy
  # over the 3-channel axis) costs several times more.
  return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def _apply_exact(im: Image.Image, p: TrainParams, size: int) -> Image.Image:
  """One frame, reference semantics (crop, then resize the crop)."""
  if p.angle is not None:
    im = im.rotate(p.angle, resample=Image.Resampling.NEAREST, expand=False)
  if p.crop is not None:
    x1, y1, w, h = p.crop
    # Brightness is per pixel, so applying it to the crop only is exact and cheaper.
    im = _brightness(im.crop((x1, y1, x1 + w, y1 + h)), p.brightness)
    return im.resize((size, size), Image.Resampling.BILINEAR)
  rw, rh, x1, y1 = p.fallback
  im = _brightness(im, p.brightness)
  if im.size != (rw, rh):
    im = im.resize((rw, rh), Image.Resampling.BILINEAR)
  return im.crop((x1, y1, x1 + size, y1 + size))


def _stack(images: Sequence[Image.Image], transform, size: int) -> np.ndarray:
  """Applies `transform` once per distinct image object, into one (T, size, size, 3) array."""
  out = np.empty((len(images), size, size, 3), np.uint8)
  done: dict[int, int] = {}
  for t, im in enumerate(images):
    first = done.get(id(im))
    if first is None:
      out[t] = np.asarray(transform(im))
      done[id(im)] = t
    else:
      out[t] = out[first]
  return out


def _check_same_size(sizes: Sequence[tuple[int, int]], names: Sequence[str]) -> None:
  for size, name in zip(sizes, names):
    if size != sizes[0]:
      raise FrameError(
        f"frames of one clip differ in size: {names[0]} is {sizes[0][0]}x{sizes[0][1]}, "
        f"{name} is {size[0]}x{size[1]} (one crop is applied to all frames)"
      )


def train_transform(
  images: Sequence[Image.Image],
  rng: np.random.Generator,
  *,
  augmentation: Augmentation,
  size: int,
) -> np.ndarray:
  """Train augmentation of one clip (see the module docstring) -> (T, size, size, 3) uint8.

  Args:
    images: the clip's RGB frames (e.g. from `decode_frames`), all the same size.
    rng: the generator of this clip's one random draw.
    augmentation: the ops and their settings.
    size: output height and width.
  """
  _check_same_size([im.size for im in images], [f"frame {t}" for t in range(len(images))])
  p = draw_train_params(*images[0].size, rng, augmentation=augmentation, size=size)
  return _stack(images, lambda im: _flip(_apply_exact(im, p, size), p.flip), size)


def test_transform(images: Sequence[Image.Image], *, size: int) -> np.ndarray:
  """Test transform: bilinear resize of each frame to size x size -> (T, size, size, 3) uint8."""
  return _stack(images, lambda im: im.resize((size, size), Image.Resampling.BILINEAR), size)


test_transform.__test__ = False  # Not a pytest test, even when imported into a test module.


_cv2_module = None


def _cv2():
  """OpenCV, imported on first use with its thread pool off.

  Pipeline parallelism comes from grain's workers and read threads; OpenCV's own threads
  on top would oversubscribe the cores (and blur the per-core cost of a clip).
  """
  global _cv2_module
  if _cv2_module is None:
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)
    _cv2_module = cv2
  return _cv2_module


def _read_bytes(frame: Frame, index: int) -> bytes:
  if isinstance(frame, bytes):
    return frame
  try:
    with open(frame, "rb") as f:
      return f.read()
  except OSError as e:
    raise FrameError(f"cannot open {_frame_name(frame, index)}: {e}") from e


def _decode_array(frame: Frame, index: int, reduce: int) -> np.ndarray:
  """One frame -> RGB uint8 (H, W, 3), decoded at 1/`reduce` scale (1, 2, 4 or 8).

  Complete baseline/progressive JPEGs (SOI ... EOI) go through `cv2.imdecode` (libjpeg-turbo,
  the same decoder as PIL's: identical pixels at full scale). Anything else -- PNG, odd
  modes, a JPEG without its end marker (truncated) -- goes through the strict PIL path of
  `decode_frames`, so bad frames raise the same `FrameError`; it is then reduced by area
  averaging to the size libjpeg's reduced decode would have.
  """
  data = _read_bytes(frame, index)
  if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
    cv2 = _cv2()
    flag = {
      1: cv2.IMREAD_COLOR_RGB,
      2: cv2.IMREAD_REDUCED_COLOR_2,
      4: cv2.IMREAD_REDUCED_COLOR_4,
      8: cv2.IMREAD_REDUCED_COLOR_8,
    }[reduce]
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is not None:
      # The IMREAD_REDUCED_* flags decode to BGR; reversing the channels is a view.
      return array if reduce == 1 else array[..., ::-1]
  try:
    im = Image.open(io.BytesIO(data))
  except Exception as e:
    raise FrameError(f"cannot open {_frame_name(frame, index)}: {e}") from e
  array = np.asarray(_load_rgb(im, frame, index))
  if reduce > 1:
    h, w = array.shape[:2]
    array = _cv2().resize(
      array, (-(-w // reduce), -(-h // reduce)), interpolation=_cv2().INTER_AREA
    )
  return array


def _decode_unique_arrays(
  frames: Sequence[Frame], indices: Sequence[int], reduce: int
) -> tuple[list[np.ndarray], list[int]]:
  """`_decode_array` once per distinct index: (arrays, position of each index's array)."""
  _require_strict_truncation()
  _check_indices(len(frames), indices)
  arrays: list[np.ndarray] = []
  slot: dict[int, int] = {}
  order = []
  for i in indices:
    i = int(i)
    if i not in slot:
      slot[i] = len(arrays)
      arrays.append(_decode_array(frames[i], i, reduce))
    order.append(slot[i])
  shape = arrays[0].shape
  for i, k in slot.items():
    if arrays[k].shape != shape:
      first = int(indices[0])
      raise FrameError(
        f"frames of one clip differ in size: {_frame_name(frames[first], first)} is "
        f"{shape[1]}x{shape[0]}, {_frame_name(frames[i], i)} is "
        f"{arrays[k].shape[1]}x{arrays[k].shape[0]}"
        + (f" (after 1/{reduce} decode)" if reduce > 1 else "")
        + " (one crop is applied to all frames)"
      )
  return arrays, order


def _full_size(frame: Frame, index: int) -> tuple[int, int]:
  im = _open(frame, index)  # Reads the header only.
  size = im.size
  im.close()
  return size


def _reduction(w: int, h: int, size: int) -> int:
  """Largest libjpeg scale 1/s (s in 1, 2, 4, 8) keeping a w x h region >= size x size."""
  for s in (8, 4, 2):
    if w // s >= size and h // s >= size:
      return s
  return 1


def _resize(src: np.ndarray, width: int, height: int, dst: np.ndarray | None = None) -> np.ndarray:
  """cv2 resize closest to PIL's bilinear: area averaging when shrinking both axes
  (PIL's bilinear filter widens with the scale, i.e. anti-aliases), else bilinear."""
  cv2 = _cv2()
  h, w = src.shape[:2]
  shrink = width <= w and height <= h
  return cv2.resize(
    src, (width, height), dst=dst, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  )


def brightness_lut(factor: float) -> np.ndarray:
  """(256,) uint8 table equal to PIL's `ImageEnhance.Brightness(im).enhance(factor)`.

  PIL blends with black in float32 and truncates: out = clip(int(v * factor), 0, 255).
  """
  return np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)


def _load_train_clip_fast(
  frames, indices, rng, *, augmentation, size, out: np.ndarray | None = None
) -> np.ndarray:
  """`load_train_clip(..., fast_decode=True)`: OpenCV decode + crop/resize, same draws."""
  _check_indices(len(frames), indices)
  first = int(indices[0])
  width, height = _full_size(frames[first], first)
  p = draw_train_params(width, height, rng, augmentation=augmentation, size=size)
  # Rotation (FERV39k) needs every pixel of the full frame: no reduced decode then.
  if p.angle is not None:
    reduce = 1
  elif p.crop is not None:
    reduce = _reduction(p.crop[2], p.crop[3], size)
  else:
    reduce = _reduction(width, height, size)
  arrays, order = _decode_unique_arrays(frames, indices, reduce)
  if reduce == 1 and arrays[0].shape[:2] != (height, width):
    raise FrameError(
      f"frame {first} decodes to {arrays[0].shape[1]}x{arrays[0].shape[0]} "
      f"but its header says {width}x{height}"
    )
  cv2 = _cv2()
  lut = None if p.brightness is None else brightness_lut(p.brightness)
  out = _output(out, len(order), size)  # (T, size, size, 3)
  done: dict[int, int] = {}
  for t, k in enumerate(order):
    if k in done:
      out[t] = out[done[k]]
      continue
    done[k] = t
    a = arrays[k]
    if p.angle is not None:
      a = np.asarray(
        Image.fromarray(a).rotate(p.angle, resample=Image.Resampling.NEAREST, expand=False)
      )
    if p.crop is not None:
      x1, y1, w, h = p.crop
      # Crop box in the reduced frame's pixels (exact when reduce == 1).
      x1, y1 = round(x1 / reduce), round(y1 / reduce)
      w, h = max(1, round(w / reduce)), max(1, round(h / reduce))
      a = a[y1 : y1 + h, x1 : x1 + w]
      if lut is not None:  # On the crop, before the resize: the reference's order.
        a = cv2.LUT(np.ascontiguousarray(a), lut)
      frame_out = _resize(a, size, size, dst=None if p.flip else out[t])
    else:
      rw, rh, x1, y1 = p.fallback
      if lut is not None:
        a = cv2.LUT(a, lut)
      if a.shape[:2] != (rh, rw):
        a = _resize(a, rw, rh)
      frame_out = a[y1 : y1 + size, x1 : x1 + size]
      if not p.flip:
        out[t] = frame_out
    if p.flip:
      cv2.flip(np.ascontiguousarray(frame_out), 1, dst=out[t])
  return out


def _output(out: np.ndarray | None, frames: int, size: int) -> np.ndarray:
  """The (T, size, size, 3) uint8 array the fast paths write into."""
  shape = (frames, size, size, 3)
  if out is None:
    return np.empty(shape, np.uint8)
  if out.shape != shape or out.dtype != np.uint8:
    raise ValueError(f"out must be a {shape} uint8 array, got {out.shape} {out.dtype}")
  return out


def load_train_clip(
  frames: Sequence[Frame],
  indices: Sequence[int],
  rng: np.random.Generator,
  *,
  augmentation: Augmentation,
  size: int,
  fast_decode: bool = False,
  out: np.ndarray | None = None,
) -> np.ndarray:
  """Decodes `frames[indices]` and applies the train augmentation -> (T, size, size, 3) uint8.

  `out`, a (T, size, size, 3) uint8 array (e.g. a row of a batch), receives the fast path's
  frames directly (one copy less per clip); the exact path ignores it. Use the return value.

  With `fast_decode=False` this equals `train_transform(decode_frames(frames, indices), rng,
  ...)`, pixel for pixel. With `fast_decode=True` the random parameters are the same (drawn
  from the full frame size, in the same order), but frames are decoded with OpenCV (at
  1/2, 1/4 or 1/8 scale when the crop keeps >= `size` pixels) and cropped + resized with
  `cv2.resize` (area averaging when shrinking, bilinear when enlarging) instead of PIL's
  bilinear filter: pixels differ slightly (see `tests/test_data_augment.py` for the bound).
  """
  if not fast_decode:
    return train_transform(
      decode_frames(frames, indices), rng, augmentation=augmentation, size=size
    )
  return _load_train_clip_fast(frames, indices, rng, augmentation=augmentation, size=size, out=out)


def load_test_clip(
  frames: Sequence[Frame],
  indices: Sequence[int],
  *,
  size: int,
  fast_decode: bool = False,
  out: np.ndarray | None = None,
) -> np.ndarray:
  """Decodes `frames[indices]` and resizes each to size x size -> (T, size, size, 3) uint8.

  `fast_decode=True` decodes with OpenCV (reduced scale while both sides stay >= size) and
  resizes with `cv2.resize`, into `out` when given (see `load_train_clip`).
  """
  if not fast_decode:
    return test_transform(decode_frames(frames, indices), size=size)
  _check_indices(len(frames), indices)
  first = int(indices[0])
  reduce = _reduction(*_full_size(frames[first], first), size)
  arrays, order = _decode_unique_arrays(frames, indices, reduce)
  out = _output(out, len(order), size)  # (T, size, size, 3)
  done: dict[int, int] = {}
  for t, k in enumerate(order):
    if k in done:
      out[t] = out[done[k]]
    else:
      done[k] = t
      _resize(arrays[k], size, size, dst=out[t])
  return out
