r"""Synthetic dynamic-expression dataset: the project's embedded default data.

Renders face-like clips with PIL (ImageDraw only) whose expression develops over
time, writes them as JPEG frame folders plus annotation lists in the reference
format (`<frame_dir> <num_frames> <label>`, paths relative to the output folder),
and is deterministic by seed: the same arguments give byte-identical files (with
the same numpy / Pillow builds; the JPEG encoder's output may differ across them).

    python -m dfer_clip_jax.data.synthetic --out=/tmp/synth --classes=7 \
        --clips=700 --seed=0 [--folds=5] [--size=64]

Layout written under `out`:
  frames/c00000/00001.jpg ...   one folder per clip, 5-digit 1-based frame names
  train.txt, test.txt           stratified split (`test_fraction` of each class)
  train_fold{i}.txt, test_fold{i}.txt   with `folds=k`: k stratified folds, i = 1..k
  synthetic.json                the generation arguments (read by the tfds builder)

Frames are 64x64 by default (`--size`): the demo trains at 32-64 px, so faces are
framed like the face crops of DFEW (the head fills most of the frame) and drawn
with cartoon proportions, anti-aliased by 2x / 4x supersampling, so that the cues
stay visible at 32 px. The input-pipeline benchmark renders at 256 px to measure
at the paper's 224 px input.

What varies per clip (nuisance, independent of the label): identity (head shape,
skin / hair / lip / eye colour, hair style, feature sizes and positions, resting
expression), head position, scale, rotation, yaw, slow head drift, blinks,
background (gradient + shapes), lighting (directional gain, brightness, colour
cast), sensor noise, clip length (uniform in `min_frames..max_frames`) and the
expression's timing (onset time and duration, apex hold, partial offset) and
intensity.

Classes (label ids as in `classes.py`) and their cues:
  0 happiness  smile (corners up), teeth, raised cheeks (blush), narrowed eyes;
               onset -> apex -> partial offset.
  1 sadness    corners down, brows' inner ends up, lowered gaze and head, a tear
               running down one cheek; slow onset.
  2 neutral    resting face; sometimes small talking movements of the mouth.
  3 anger      brows down in a V, narrowed eyes, pressed narrow lips, flushed skin.
  4 surprise   brows up, eyes wide, mouth open in an O: FAST onset, then held still.
  5 disgust    nose wrinkles, raised upper lip, tongue out, corners down, squint.
  6 fear       the SAME apex as surprise, but after onset the expression oscillates
               (mouth / eyes / brows open and close 3-5 times per clip) and the
               head trembles (per-frame jitter).
  7 contempt   one-sided smirk (one mouth corner raised), chin up, slight squint.
  8 anxiety    worried brows, pressed stretched lips, eyes darting left / right
               and frequent blinks.
  9 helplessness  raised worried brows, closed down-turned mouth, eyes up, head
               tilted to one side, in TWO pulses.
  10 disappointment  starts with a smile that turns into a frown (brows and gaze
               lowered) part-way through the clip.
Classes that differ mainly in their dynamics: surprise vs fear (identical apex;
hold vs oscillation + tremble: a single apex frame cannot tell them apart),
disappointment (its frames look like happiness early and like a mild sadness
late; only the order and the mix tell it apart), and, to a lesser degree,
helplessness (two pulses) and anxiety (darting gaze and blinks). Timing is defined
on normalised clip time, so the 16 frames sampled from any clip length show it.

Randomness: clip `i` uses `np.random.default_rng([seed, i])` for its length and
`render_clip`; `render_clip` derives separate streams for identity, scene,
motion, noise and expression, so two labels rendered from equally seeded
generators share identity, background, motion and noise and differ only in the
expression.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import tqdm
from absl import flags
from PIL import Image, ImageDraw

from dfer_clip_jax import cli

NUM_CLASSES_CHOICES = (7, 11)
DEFAULT_IMAGE_SIZE = 64
JPEG_QUALITY = 92
META_FILE = "synthetic.json"
# Entropy word of the split generator: clip indices are < 2**32, so this never
# collides with a clip's `[seed, index]` stream.
_SPLIT_STREAM = 2**32

# Expression parameters: each frame's face is `rest + intensity * envelope(t) *
# apex_delta` (plus class-specific dynamics below).
_PARAMS = (
  "curve",
  "open",
  "width",
  "asym",
  "teeth",
  "lip_raise",
  "press",
  "brow_raise",
  "brow_angle",
  "eye_open",
  "cheek",
  "wrinkle",
  "gaze_x",
  "gaze_y",
  "pitch",
  "tilt",
  "flush",
  "tear",
  "tongue",
)

# Apex deltas from the resting face, per label. `curve` > 0 lifts the mouth
# corners; `brow_angle` > 0 lifts the brows' inner ends (worry), < 0 lowers them
# (anger V); `eye_open` is added to the eye-opening factor 1; `pitch` moves the
# inner face down (head bowed); `tilt` rolls the head (sign drawn per clip).
_SURPRISE_APEX = {"brow_raise": 1.0, "eye_open": 0.65, "open": 1.0, "width": -0.3}
_APEX: dict[int, dict[str, float]] = {
  0: {
    "curve": 1.0,
    "open": 0.3,
    "teeth": 1.0,
    "cheek": 1.0,
    "eye_open": -0.4,
    "brow_raise": 0.15,
    "width": 0.15,
  },
  1: {
    "curve": -1.0,
    "brow_angle": 1.0,
    "brow_raise": -0.1,
    "eye_open": -0.3,
    "tear": 1.0,
    "gaze_y": 0.7,
    "pitch": 0.6,
    "press": 0.3,
  },
  2: {},
  3: {
    "brow_raise": -0.9,
    "brow_angle": -1.0,
    "eye_open": -0.4,
    "width": -0.25,
    "curve": -0.3,
    "press": 1.0,
    "flush": 1.0,
  },
  4: dict(_SURPRISE_APEX),
  5: {
    "wrinkle": 1.0,
    "lip_raise": 1.0,
    "open": 0.35,
    "tongue": 1.0,
    "curve": -0.5,
    "brow_raise": -0.45,
    "brow_angle": -0.3,
    "eye_open": -0.45,
  },
  6: dict(_SURPRISE_APEX),
  7: {"asym": 1.0, "eye_open": -0.2, "brow_raise": -0.1, "pitch": -0.5},
  8: {
    "brow_angle": 0.75,
    "brow_raise": 0.25,
    "width": 0.2,
    "press": 0.8,
    "curve": -0.15,
    "eye_open": 0.2,
  },
  9: {
    "brow_raise": 0.6,
    "brow_angle": 0.6,
    "curve": -0.6,
    "press": 0.6,
    "tilt": 1.0,
    "gaze_y": -0.5,
  },
  10: {
    "curve": -0.7,
    "brow_angle": 0.4,
    "brow_raise": -0.3,
    "eye_open": -0.3,
    "gaze_y": 0.6,
    "pitch": 0.4,
    "press": 0.4,
  },
}
# Disappointment starts from this mild smile and turns into `_APEX[10]`.
_DISAPPOINTMENT_START = {"curve": 0.7, "cheek": 0.5, "eye_open": -0.1, "teeth": 0.4, "open": 0.15}


@dataclasses.dataclass(frozen=True)
class _Identity:
  """Who the face is: fixed for a clip."""

  head_ry: float  # head half-height, in head half-widths
  skin: np.ndarray  # (3,) float RGB
  hair: np.ndarray
  lips: np.ndarray
  iris: np.ndarray
  hair_style: int  # 0 bald, 1 cap, 2 long
  eye_y: float  # feature positions in head half-widths (y down)
  eye_dx: float
  eye_rx: float
  eye_ry: float
  brow_gap: float
  brow_w: float
  nose_y: float
  mouth_y: float
  mouth_w: float
  lip_w: float
  rest: dict[str, float]  # resting expression offsets


def _identity(rng: np.random.Generator) -> _Identity:
  """Draws an identity (face geometry, colours, resting expression)."""
  tone = rng.uniform(0.0, 1.0)
  # Skin tones on a line from light to dark, with a small random hue shift.
  skin = (1 - tone) * np.array([238.0, 205.0, 180.0]) + tone * np.array([110.0, 72.0, 50.0])
  skin = skin + rng.uniform(-12, 12, size=3)
  hair = rng.choice(
    np.array(
      [
        [30.0, 25.0, 20.0],
        [90.0, 60.0, 35.0],
        [170.0, 130.0, 70.0],
        [120.0, 40.0, 20.0],
        [140.0, 140.0, 140.0],
        [60.0, 45.0, 40.0],
      ]
    )
  )
  hair = hair + rng.uniform(-10, 10, size=3)
  lips = 0.55 * skin + 0.45 * np.array([170.0, 60.0, 70.0]) + rng.uniform(-10, 10, size=3)
  iris = rng.choice(
    np.array([[60.0, 40.0, 25.0], [50.0, 90.0, 140.0], [70.0, 110.0, 60.0], [35.0, 30.0, 30.0]])
  )
  rest = {
    "curve": rng.uniform(-0.12, 0.12),
    "brow_raise": rng.uniform(-0.15, 0.15),
    "eye_open": rng.uniform(-0.1, 0.1),
    "open": rng.uniform(0.0, 0.05),
    "width": rng.uniform(-0.1, 0.1),
  }
  return _Identity(
    head_ry=rng.uniform(1.15, 1.35),
    skin=skin,
    hair=hair,
    lips=lips,
    iris=iris,
    hair_style=int(rng.integers(3)),
    eye_y=rng.uniform(-0.28, -0.14),
    eye_dx=rng.uniform(0.36, 0.46),
    eye_rx=rng.uniform(0.19, 0.25),
    eye_ry=rng.uniform(0.10, 0.14),
    brow_gap=rng.uniform(0.24, 0.32),
    brow_w=rng.uniform(0.08, 0.12),
    nose_y=rng.uniform(0.18, 0.28),
    mouth_y=rng.uniform(0.55, 0.68),
    mouth_w=rng.uniform(0.36, 0.46),
    lip_w=rng.uniform(0.07, 0.1),
    rest=rest,
  )


@dataclasses.dataclass(frozen=True)
class _Scene:
  """Camera, background and lighting: fixed for a clip."""

  background: Image.Image  # RGB at canvas size
  gain: np.ndarray  # (H, W, 1) float32 directional lighting, output size
  cast: np.ndarray  # (3,) float32 colour cast x brightness
  noise_std: float
  center: tuple[float, float]  # head centre, in output pixels
  scale: float  # head half-width, in output pixels
  angle: float  # base roll, degrees
  yaw: float  # shifts inner features sideways


def _scene(rng: np.random.Generator, size: int, ss: int) -> _Scene:
  """Draws background, lighting, head placement and noise level."""
  canvas = size * ss
  c0, c1 = rng.uniform(20, 235, size=(2, 3))
  theta = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas - 0.5
  ramp = np.clip(0.5 + np.cos(theta) * xx + np.sin(theta) * yy, 0, 1)[..., None]
  bg = Image.fromarray(((1 - ramp) * c0 + ramp * c1).astype(np.uint8))
  draw = ImageDraw.Draw(bg)
  for _ in range(int(rng.integers(0, 4))):
    x0, y0 = rng.uniform(-0.2, 1.0, size=2) * canvas
    w, h = rng.uniform(0.1, 0.6, size=2) * canvas
    colour = tuple(int(v) for v in rng.uniform(20, 235, size=3))
    box = [x0, y0, x0 + w, y0 + h]
    if rng.uniform() < 0.5:
      draw.rectangle(box, fill=colour)
    else:
      draw.ellipse(box, fill=colour)
  light_dir = rng.uniform(0, 2 * np.pi)
  strength = rng.uniform(0.0, 0.35)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
  gain = 1 + strength * (np.cos(light_dir) * xx + np.sin(light_dir) * yy)
  cast = rng.uniform(0.65, 1.25) * rng.uniform(0.9, 1.1, size=3)
  # Face-cropped framing, as in DFEW / FERV39k / MAFW: the head fills most of the frame.
  scale = rng.uniform(0.38, 0.44) * size
  center = (size * (0.5 + rng.uniform(-0.04, 0.04)), size * (0.5 + rng.uniform(-0.04, 0.04)))
  return _Scene(
    background=bg,
    gain=gain[..., None].astype(np.float32),
    cast=cast.astype(np.float32),
    noise_std=rng.uniform(1.0, 6.0),
    center=center,
    scale=scale,
    angle=rng.uniform(-8, 8),
    yaw=rng.uniform(-0.12, 0.12),
  )


def _smoothstep(x: np.ndarray) -> np.ndarray:
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3 - 2 * x)


def _ramp(u: np.ndarray, start: float, duration: float) -> np.ndarray:
  return _smoothstep((u - start) / max(duration, 1e-6))


def _standard_envelope(
  u: np.ndarray, rng: np.random.Generator, onset_range=(0.1, 0.3)
) -> np.ndarray:
  """Onset -> apex hold -> partial offset, on normalised time `u` in [0, 1]."""
  start = rng.uniform(0.0, 0.3)
  onset = rng.uniform(*onset_range)
  hold = rng.uniform(0.25, 0.6)
  offset = rng.uniform(0.1, 0.3)
  final = rng.uniform(0.3, 0.8)
  up = _ramp(u, start, onset)
  down = _ramp(u, start + onset + hold, offset)
  return up * (1 - (1 - final) * down)


def _bump(u: np.ndarray, center: float, width: float) -> np.ndarray:
  half = width / 2
  return _ramp(u, center - half, 0.3 * width) * (1 - _ramp(u, center + 0.2 * width, 0.3 * width))


@dataclasses.dataclass(frozen=True)
class _Trajectory:
  """Per-frame expression and pose: arrays of shape (T,)."""

  params: dict[str, np.ndarray]
  blink: np.ndarray  # eyelid closure in [0, 1]
  dx: np.ndarray  # head offset, in head half-widths
  dy: np.ndarray
  dangle: np.ndarray  # degrees


def _motion(rng: np.random.Generator, u: np.ndarray, num_frames: int):
  """Label-independent slow head drift and natural (brief) blinks."""

  def drift(amplitude):
    f = rng.uniform(0.2, 1.0, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    amp = rng.uniform(0, amplitude, size=2)
    return sum(a * np.sin(2 * np.pi * fi * u + p) for a, fi, p in zip(amp, f, phase))

  dx, dy, dangle = drift(0.08), drift(0.06), drift(3.0)
  blink = np.zeros(num_frames)
  # Natural blinks last 1-2 frames: mostly invisible after 16-frame sampling.
  for _ in range(int(rng.poisson(0.3 + num_frames / 80))):
    t0 = int(rng.integers(num_frames))
    blink[t0 : t0 + int(rng.integers(1, 3))] = 1.0
  return dx, dy, dangle, blink


def _expression(
  label: int, rng: np.random.Generator, u: np.ndarray, identity: _Identity
) -> _Trajectory:
  """Class-specific time course: expression, extra blinks and head jitter."""
  if label not in _APEX:
    raise ValueError(f"label {label} is outside the synthetic classes 0..{max(_APEX)}")
  n = u.shape[0]
  zeros = np.zeros(n)
  params = {k: np.full(n, identity.rest.get(k, 0.0)) for k in _PARAMS}
  blink, jx, jy, jangle = zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy()
  intensity = rng.uniform(0.75, 1.0)
  side = 1.0 if rng.uniform() < 0.5 else -1.0
  apex = dict(_APEX[label])
  for key in ("asym", "tilt", "tear"):  # one-sided cues: the side is drawn per clip
    if key in apex:
      apex[key] *= side

  if label == 2:  # neutral: occasional talking
    if rng.uniform() < 0.5:
      f, phase = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
      params["open"] += 0.15 * np.maximum(0, np.sin(2 * np.pi * f * u + phase))
    return _Trajectory(params, blink, jx, jy, jangle)
  if label == 4:  # surprise: fast onset, then held
    start = rng.uniform(0.1, 0.4)
    env = _ramp(u, start, rng.uniform(0.02, 0.06))
  elif label == 6:  # fear: surprise's apex, oscillating, with tremble
    start = rng.uniform(0.1, 0.4)
    on = _ramp(u, start, rng.uniform(0.04, 0.12))
    f, phase = rng.uniform(3, 5), rng.uniform(0, 2 * np.pi)
    env = on * (0.6 + 0.4 * np.sin(2 * np.pi * f * (u - start) + phase))
    jx = on * rng.normal(0, 0.035, n)
    jy = on * rng.normal(0, 0.035, n)
    jangle = on * rng.normal(0, 2.5, n)
  elif label == 1:  # sadness: slow onset
    env = _standard_envelope(u, rng, onset_range=(0.25, 0.45))
  elif label == 8:  # anxiety: worried face, darting eyes, frequent blinks
    env = _standard_envelope(u, rng)
    f, phase = rng.uniform(2.5, 4.0), rng.uniform(0, 2 * np.pi)
    params["gaze_x"] += 0.9 * env * np.sign(np.sin(2 * np.pi * f * u + phase))
    for center in rng.uniform(0, 1, size=int(rng.integers(5, 9))):
      blink = np.maximum(blink, env * (np.abs(u - center) < rng.uniform(0.02, 0.04)))
  elif label == 9:  # helplessness: two pulses
    width = rng.uniform(0.25, 0.35)
    env = np.minimum(
      1.0, _bump(u, rng.uniform(0.2, 0.35), width) + _bump(u, rng.uniform(0.62, 0.8), width)
    )
  elif label == 10:  # disappointment: smile turning into a frown
    turn = _ramp(u, rng.uniform(0.3, 0.55), rng.uniform(0.1, 0.25))
    for k in _PARAMS:
      start_v = _DISAPPOINTMENT_START.get(k, 0.0)
      params[k] += intensity * ((1 - turn) * start_v + turn * apex.get(k, 0.0))
    return _Trajectory(params, blink, jx, jy, jangle)
  else:
    env = _standard_envelope(u, rng)
  for k, v in apex.items():
    params[k] += intensity * env * v
  return _Trajectory(params, blink, jx, jy, jangle)


def _trajectory(
  label: int,
  num_frames: int,
  identity: _Identity,
  motion_rng: np.random.Generator,
  expr_rng: np.random.Generator,
) -> _Trajectory:
  u = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
  dx, dy, dangle, blink = _motion(motion_rng, u, num_frames)
  expr = _expression(label, expr_rng, u, identity)
  return _Trajectory(
    params=expr.params,
    blink=np.maximum(blink, expr.blink),
    dx=dx + expr.dx,
    dy=dy + expr.dy,
    dangle=dangle + expr.dangle,
  )


class _Painter:
  """Draws face-local shapes (head half-width units, y down) on a canvas."""

  def __init__(
    self, draw: ImageDraw.ImageDraw, cx: float, cy: float, scale: float, angle_deg: float
  ):
    self.draw = draw
    self.scale = scale
    a = math.radians(angle_deg)
    self._cos, self._sin = math.cos(a), math.sin(a)
    self._cx, self._cy = cx, cy

  def pts(self, xy: np.ndarray) -> list[tuple[float, float]]:
    x, y = xy[:, 0] * self.scale, xy[:, 1] * self.scale
    px = self._cx + self._cos * x - self._sin * y
    py = self._cy + self._sin * x + self._cos * y
    return list(zip(px.tolist(), py.tolist()))

  def polygon(self, xy: np.ndarray, fill) -> None:
    self.draw.polygon(self.pts(xy), fill=fill)

  def line(self, xy: np.ndarray, fill, width: float) -> None:
    """A polyline `width` head half-widths wide (at least one canvas pixel)."""
    self.draw.line(self.pts(xy), fill=fill, width=max(1, round(width * self.scale)), joint="curve")


def _ellipse(
  cx: float, cy: float, rx: float, ry: float, n: int = 28, t0: float = 0.0, t1: float = 2 * np.pi
) -> np.ndarray:
  t = np.linspace(t0, t1, n, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
  c = np.clip(c, 0, 255)
  return int(c[0]), int(c[1]), int(c[2])


def _draw_face(
  p: _Painter, ident: _Identity, v: dict[str, float], blink: float, yaw: float
) -> None:
  """Draws one frame's face with expression values `v` (scalars)."""
  skin, ry = ident.skin, ident.head_ry
  dark = _rgb(skin * 0.55)
  if v["flush"] > 0.01:  # anger reddens the face
    skin = skin + min(v["flush"], 1.0) * 0.25 * (np.array([205.0, 55.0, 45.0]) - skin)
  p.polygon(
    np.array([[-0.4, ry - 0.4], [0.4, ry - 0.4], [0.45, ry + 1.0], [-0.45, ry + 1.0]]),
    fill=_rgb(ident.skin * 0.85),
  )  # neck
  if ident.hair_style == 2:  # long hair behind the head
    p.polygon(_ellipse(0, 0.15, 1.18, ry + 0.1), fill=_rgb(ident.hair))
  for side in (-1, 1):  # ears
    p.polygon(_ellipse(side * 0.98, -0.05, 0.14, 0.24, n=14), fill=_rgb(skin * 0.92))
  p.polygon(_ellipse(0, 0, 1.0, ry, n=40), fill=_rgb(skin))
  if ident.hair_style in (1, 2):  # hair cap over the top of the head
    cap = _ellipse(0, -0.05, 1.04, ry + 0.06, n=20, t0=np.pi, t1=2 * np.pi)
    cap = np.concatenate([cap, [[1.04, -0.05], [0.7, -0.45], [-0.7, -0.45]]])
    p.polygon(cap, fill=_rgb(ident.hair))

  # Inner features move with yaw (sideways) and pitch (down when bowed).
  ox = yaw
  oy = 0.1 * v["pitch"]
  if v["cheek"] > 0.01:
    blush = skin + min(v["cheek"], 1.0) * (np.array([225.0, 95.0, 105.0]) - skin) * 0.6
    for side in (-1, 1):
      p.polygon(
        _ellipse(ox + side * 0.5, oy + ident.eye_y + 0.38 - 0.06 * v["cheek"], 0.2, 0.13, n=16),
        fill=_rgb(blush),
      )

  # Eyes: sclera, iris clipped to the opening, upper lid line.
  opening = max(0.0, 1.0 + v["eye_open"]) * (1.0 - 0.92 * min(blink, 1.0))
  eye_ry = ident.eye_ry * opening
  for side in (-1, 1):
    ex, ey = ox + side * ident.eye_dx, oy + ident.eye_y
    rx = ident.eye_rx
    if eye_ry > 0.015:
      p.polygon(_ellipse(ex, ey, rx, eye_ry, n=20), fill=(240, 240, 235))
      ir = 0.55 * ident.eye_rx
      gx = ex + v["gaze_x"] * (rx - ir) * 0.9
      gy = ey + v["gaze_y"] * 0.5 * eye_ry
      iris = _ellipse(gx, gy, ir, ir, n=16)
      # Clip the iris to the eye opening so a squint flattens it.
      rel = np.clip((iris[:, 0] - ex) / rx, -1, 1)
      lim = eye_ry * np.sqrt(1 - rel**2)
      iris[:, 1] = np.clip(iris[:, 1], ey - lim, ey + lim)
      p.polygon(iris, fill=_rgb(ident.iris))
      pupil = iris.copy()
      pupil[:, 0] = gx + (pupil[:, 0] - gx) * 0.45
      pupil[:, 1] = gy + (pupil[:, 1] - gy) * 0.45
      p.polygon(pupil, fill=(15, 12, 12))
    lid = _ellipse(ex, ey, rx * 1.05, max(eye_ry, 0.01), n=12, t0=np.pi, t1=2 * np.pi + 1e-6)
    lid = np.concatenate([lid, [[ex + rx * 1.05, ey]]])
    p.line(lid, fill=(25, 20, 20), width=0.04)

  # A tear rolling down from one eye as sadness builds up.
  if abs(v["tear"]) > 0.2:
    side = float(np.sign(v["tear"]))
    ty = oy + ident.eye_y + ident.eye_ry + 0.12 + 0.4 * (min(abs(v["tear"]), 1.0) - 0.2)
    tx = ox + side * (ident.eye_dx + 0.05)
    drop = np.concatenate(
      [[[tx, ty - 0.16]], _ellipse(tx, ty, 0.08, 0.1, n=12, t0=-0.25 * np.pi, t1=1.25 * np.pi)]
    )
    p.polygon(drop, fill=(120, 185, 250))

  # Brows: inner and outer ends move with raise and angle.
  base = oy + ident.eye_y - ident.brow_gap - 0.2 * v["brow_raise"]
  for side in (-1, 1):
    inner_x, outer_x = ox + side * 0.12, ox + side * (ident.eye_dx + ident.eye_rx + 0.06)
    inner_y = base - 0.17 * v["brow_angle"]
    outer_y = base + 0.06 * v["brow_angle"]
    mid = [(inner_x + outer_x) / 2, (inner_y + outer_y) / 2 - 0.05]
    p.line(
      np.array([[inner_x, inner_y], mid, [outer_x, outer_y]]),
      fill=_rgb(ident.hair * 0.8),
      width=ident.brow_w,
    )

  # Nose bridge, nostril line, disgust wrinkles.
  ny = oy + ident.nose_y - 0.04 * v["wrinkle"]
  p.line(
    np.array([[ox + 0.02, oy + ident.eye_y + 0.1], [ox + 0.06, ny - 0.02], [ox, ny]]),
    fill=_rgb(skin * 0.78),
    width=0.045,
  )
  p.line(
    np.array([[ox - 0.12, ny], [ox - 0.04, ny + 0.03], [ox + 0.04, ny + 0.03], [ox + 0.12, ny]]),
    fill=dark,
    width=0.045,
  )
  if v["wrinkle"] > 0.05:
    for k in range(3):
      y = oy + ident.eye_y + 0.06 + 0.07 * k
      w = 0.16 * min(v["wrinkle"], 1.0)
      p.line(
        np.array([[ox - w, y + 0.02], [ox, y - 0.01], [ox + w, y + 0.02]]), fill=dark, width=0.035
      )

  # Mouth: upper / lower lip curves over x in [-w, w].
  w = ident.mouth_w * max(0.4, 1.0 + v["width"])
  xs = np.linspace(-1.0, 1.0, 15)
  q = xs**2
  bump = np.sqrt(np.clip(1 - q, 0, 1))
  my = oy + ident.mouth_y
  asym = v["asym"]
  base_y = my - 0.28 * v["curve"] * q - 0.34 * abs(asym) * q * (xs * np.sign(asym) > 0)
  open_ = max(0.0, v["open"])
  upper = base_y - (0.08 * open_ + 0.12 * max(0.0, v["lip_raise"])) * bump
  lower = base_y + 0.42 * open_ * bump
  x = ox + w * xs
  if open_ > 0.02 or v["lip_raise"] > 0.05:
    inside = np.concatenate([np.stack([x, upper], 1), np.stack([x, lower], 1)[::-1]])
    p.polygon(inside, fill=(70, 20, 28))
    teeth = min(max(v["teeth"], 0.0), 1.0)
    if teeth > 0.05:
      t_low = np.minimum(upper + teeth * 0.11 * bump, lower)
      band = np.concatenate([np.stack([x, upper], 1), np.stack([x, t_low], 1)[::-1]])
      p.polygon(band, fill=(235, 232, 220))
    if v["tongue"] > 0.05:
      t = min(v["tongue"], 1.0)
      p.polygon(
        _ellipse(ox, float(lower[7]) - 0.02 + 0.06 * t, 0.45 * w, 0.05 + 0.1 * t, n=16),
        fill=(215, 80, 95),
      )
  lip_w = ident.lip_w * (1.0 - 0.55 * min(max(v["press"], 0.0), 1.0))
  p.line(np.stack([x, upper], 1), fill=_rgb(ident.lips), width=lip_w)
  p.line(np.stack([x, lower], 1), fill=_rgb(ident.lips), width=lip_w * 1.2)


def _supersampling(size: int) -> int:
  """Canvas factor so that shapes are anti-aliased at small sizes."""
  if size >= 128:
    return 1
  return 2 if size >= 64 else 4


def render_clip(
  label: int, num_frames: int, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE
) -> np.ndarray:
  """Renders one synthetic clip of class `label`.

  Args:
    label: class id 0..10 (see the module docstring for the cues).
    num_frames: number of frames T >= 1.
    rng: the clip's generator; the same generator state gives the same clip.
    size: frame height and width in pixels (>= 16).

  Returns:
    (T, size, size, 3) uint8 RGB frames.
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if size < 16:
    raise ValueError(f"size must be >= 16 pixels, got {size}")
  if label not in _APEX:
    raise ValueError(f"label {label} is outside the synthetic classes 0..{max(_APEX)}")
  # Separate streams: only `expr_rng` depends on the label, so equally seeded
  # generators give the same identity, scene, motion and noise for every label.
  id_rng, scene_rng, motion_rng, noise_rng, expr_rng = (
    np.random.default_rng(s) for s in rng.integers(0, 2**63, size=5)
  )
  ss = _supersampling(size)
  ident = _identity(id_rng)
  scene = _scene(scene_rng, size, ss)
  traj = _trajectory(label, num_frames, ident, motion_rng, expr_rng)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  colour = scene.gain * scene.cast  # (H, W, 3)
  for t in range(num_frames):
    img = scene.background.copy()
    v = {k: float(traj.params[k][t]) for k in _PARAMS}
    angle = scene.angle + float(traj.dangle[t]) + 12.0 * v["tilt"]
    cx = (scene.center[0] + float(traj.dx[t]) * scene.scale) * ss
    cy = (scene.center[1] + float(traj.dy[t]) * scene.scale) * ss
    painter = _Painter(ImageDraw.Draw(img), cx, cy, scene.scale * ss, angle)
    _draw_face(painter, ident, v, float(traj.blink[t]), scene.yaw)
    if ss > 1:
      img = img.reduce(ss)
    frame = np.asarray(img, np.float32) * colour
    frame += noise_rng.standard_normal(frame.shape, dtype=np.float32) * scene.noise_std
    frames[t] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
  return frames


def apex_values(label: int) -> dict[str, float]:
  """The class's apex expression deltas (documentation and tests)."""
  return dict(_APEX[label])


def _clip_length(rng: np.random.Generator, min_frames: int, max_frames: int) -> int:
  return int(rng.integers(min_frames, max_frames + 1))


def _render_and_write(task: tuple) -> tuple[int, int]:
  """Pool worker: renders clip `index` and writes its JPEG frames."""
  out_dir, index, label, seed, size, min_frames, max_frames = task
  rng = np.random.default_rng([seed, index])
  num_frames = _clip_length(rng, min_frames, max_frames)
  frames = render_clip(label, num_frames, rng, size)
  clip_dir = pathlib.Path(out_dir) / "frames" / _clip_id(index)
  clip_dir.mkdir(parents=True, exist_ok=True)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(clip_dir / f"{t + 1:05d}.jpg", "JPEG", quality=JPEG_QUALITY)
  return index, num_frames


def _clip_id(index: int) -> str:
  return f"c{index:05d}"


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
  """A random order of each class's clip indices."""
  return {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def _write_list(
  path: pathlib.Path, indices: Sequence[int], num_frames: dict[int, int], labels: np.ndarray
) -> None:
  lines = [f"frames/{_clip_id(i)} {num_frames[i]} {int(labels[i])}\n" for i in sorted(indices)]
  path.write_text("".join(lines))


def generate(
  out_dir: str | os.PathLike,
  *,
  num_classes: int = 7,
  num_clips: int = 700,
  seed: int = 0,
  folds: int = 0,
  test_fraction: float = 0.2,
  image_size: int = DEFAULT_IMAGE_SIZE,
  min_frames: int = 8,
  max_frames: int = 120,
  processes: int | None = None,
  overwrite: bool = False,
  progress: Callable[[int, int], None] | None = None,
) -> dict[str, pathlib.Path]:
  """Renders the synthetic dataset into `out_dir`.

  Labels cycle through the classes (clip i has label i % num_classes), so every
  class has num_clips // num_classes or one more clips.

  Args:
    out_dir: output folder (created).
    num_classes: 7 (DFEW classes) or 11 (MAFW classes).
    num_clips: number of clips.
    seed: generation seed; same arguments -> byte-identical files.
    folds: if k > 0, also write k stratified folds `train_fold{i}.txt` /
      `test_fold{i}.txt`, i = 1..k.
    test_fraction: fraction of each class in `test.txt`.
    image_size: frame size in pixels (square).
    min_frames, max_frames: clip length range (inclusive, uniform).
    processes: worker processes; None -> os.cpu_count(); 1 -> no pool. Workers are
      spawned (not forked), so a calling script needs the `if __name__ == '__main__':`
      guard.
    overwrite: replace an existing `frames/` folder (refused otherwise).
    progress: optional callback (done, total) after each clip.

  Returns:
    annotation file paths by name: 'train', 'test', and 'train_fold{i}' /
    'test_fold{i}' with folds; also 'meta' (synthetic.json).
  """
  if num_classes not in NUM_CLASSES_CHOICES:
    raise ValueError(f"num_classes must be one of {NUM_CLASSES_CHOICES}, got {num_classes}")
  if num_clips < 2 * num_classes:
    raise ValueError(
      f"num_clips must be >= 2 * num_classes = {2 * num_classes} so that "
      f"every class has a train and a test clip, got {num_clips}"
    )
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if folds < 0 or folds == 1 or folds > num_clips // num_classes:
    raise ValueError(
      f"folds must be 0 or 2..{num_clips // num_classes} (clips per class), got {folds}"
    )
  if not 1 <= min_frames <= max_frames:
    raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
  out = pathlib.Path(out_dir)
  frames_dir = out / "frames"
  if frames_dir.exists() and any(frames_dir.iterdir()):
    if not overwrite:
      raise FileExistsError(
        f"{frames_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
      )
    shutil.rmtree(frames_dir)
  frames_dir.mkdir(parents=True, exist_ok=True)

  labels = np.arange(num_clips) % num_classes
  tasks = [
    (str(out), i, int(labels[i]), seed, image_size, min_frames, max_frames)
    for i in range(num_clips)
  ]
  num_frames: dict[int, int] = {}
  processes = processes or os.cpu_count() or 1
  if processes == 1:
    for task in tasks:
      i, n = _render_and_write(task)
      num_frames[i] = n
      if progress:
        progress(len(num_frames), num_clips)
  else:
    # spawn: the caller may have imported JAX (threads), where fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=processes) as pool:
      chunk = max(1, min(16, num_clips // (4 * processes)))
      for i, n in pool.imap_unordered(_render_and_write, tasks, chunksize=chunk):
        num_frames[i] = n
        if progress:
          progress(len(num_frames), num_clips)

  split_rng = np.random.default_rng([seed, _SPLIT_STREAM])
  paths: dict[str, pathlib.Path] = {}
  test: list[int] = []
  for order in _stratified_order(labels, split_rng).values():
    n_test = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    test.extend(order[:n_test].tolist())
  test_set = set(test)
  train = [i for i in range(num_clips) if i not in test_set]
  paths["train"], paths["test"] = out / "train.txt", out / "test.txt"
  _write_list(paths["train"], train, num_frames, labels)
  _write_list(paths["test"], test, num_frames, labels)
  if folds:
    fold_of = np.empty(num_clips, np.int64)
    for order in _stratified_order(labels, split_rng).values():
      fold_of[order] = np.arange(len(order)) % folds
    for k in range(folds):
      paths[f"train_fold{k + 1}"] = out / f"train_fold{k + 1}.txt"
      paths[f"test_fold{k + 1}"] = out / f"test_fold{k + 1}.txt"
      _write_list(paths[f"train_fold{k + 1}"], np.flatnonzero(fold_of != k), num_frames, labels)
      _write_list(paths[f"test_fold{k + 1}"], np.flatnonzero(fold_of == k), num_frames, labels)
  meta = {
    "num_classes": num_classes,
    "num_clips": num_clips,
    "seed": seed,
    "folds": folds,
    "test_fraction": test_fraction,
    "image_size": image_size,
    "min_frames": min_frames,
    "max_frames": max_frames,
  }
  paths["meta"] = out / META_FILE
  paths["meta"].write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  return paths


def read_meta(out_dir: str | os.PathLike) -> dict:
  """Reads `synthetic.json` written by `generate`."""
  path = pathlib.Path(out_dir) / META_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} is missing: is {out_dir} a folder written by dfer_clip_jax.data.synthetic?"
    )
  return json.loads(path.read_text())


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", None, "output folder", required=True, flag_values=fv)
  flags.DEFINE_enum(
    "classes", "7", [str(n) for n in NUM_CLASSES_CHOICES], "number of classes", flag_values=fv
  )
  flags.DEFINE_integer("clips", 700, "clips to render", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
  flags.DEFINE_integer("folds", 0, "k stratified folds (0: none)", flag_values=fv)
  flags.DEFINE_integer("size", DEFAULT_IMAGE_SIZE, "frame size, px", flag_values=fv)
  flags.DEFINE_float(
    "test_fraction", 0.2, "fraction of each class in the test list", flag_values=fv
  )
  flags.DEFINE_integer("min_frames", 8, "shortest clip (frames)", flag_values=fv)
  flags.DEFINE_integer("max_frames", 120, "longest clip (frames)", flag_values=fv)
  flags.DEFINE_integer("processes", None, "worker processes (default: all cores)", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "replace existing frames/", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Renders the synthetic dynamic-expression dataset (`python -m dfer_clip_jax.data.synthetic`)."""
  args, _ = cli.parse(
    "python -m dfer_clip_jax.data.synthetic",
    "Render the synthetic dynamic-expression dataset.",
    _define,
    argv,
    paths=("out",),
  )
  args.classes = int(args.classes)
  start = time.perf_counter()
  with tqdm.tqdm(total=args.clips, unit="clip", desc="rendering") as bar:
    paths = generate(
      args.out,
      num_classes=args.classes,
      num_clips=args.clips,
      seed=args.seed,
      folds=args.folds,
      test_fraction=args.test_fraction,
      image_size=args.size,
      min_frames=args.min_frames,
      max_frames=args.max_frames,
      processes=args.processes,
      overwrite=args.overwrite,
      progress=lambda done, total: bar.update(1),
    )
  print(
    f"wrote {args.clips} clips to {args.out} in {time.perf_counter() - start:.1f} s "
    f"({os.cpu_count()} cores); lists: " + ", ".join(p.name for p in paths.values())
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
