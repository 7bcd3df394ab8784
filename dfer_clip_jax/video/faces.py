"""Face detection, tracking over time, box smoothing and square face crops.

Detector: OpenCV's Haar cascades, whose model files ship inside the `opencv-python-headless`
wheel (`cv2.data.haarcascades`), so nothing is downloaded at run time. The frontal cascade
(`alt2`, fewer false alarms than `default`) runs first; where it finds nothing, the profile
cascade runs on the frame and on its mirror image (it only knows faces turned one way).
Frames are detected on a grey copy whose longer side is at most `max_side` pixels, without
histogram equalisation: the cascades normalise each window's contrast themselves, and a global
equalisation driven by a large plain background hides small faces.

Tracking: detections on the sampled frames are linked greedily to the track whose expected box
(its latest box moved at its recent velocity) they overlap most (IoU, or centre distance within
half a face for motion the velocity did not foresee), within `max_gap_s`; fragments of one face
split by a longer miss are joined when they don't overlap in time and the next one begins where
the previous one was heading. Tracks seen on too few frames are dropped as false
alarms. The main face is the track with the largest sum of box sides (large and persistent).

Smoothing: the box at any time is a Gaussian-weighted (in time) mean of the track's boxes, which
interpolates between detection frames and removes the detector's jitter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"


@dataclasses.dataclass(frozen=True)
class Detection:
  box: np.ndarray  # (4,) x0, y0, x1, y1 in frame pixels (float)
  score: float


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two (4,) x0, y0, x1, y1 boxes."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def _side(box: np.ndarray) -> float:
  return float(math.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)))


def _centre_distance(a: np.ndarray, b: np.ndarray) -> float:
  return float(math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))


def non_max_suppression(dets: Sequence[Detection], threshold: float = 0.3) -> list[Detection]:
  """Keeps the higher-scoring of detections that overlap by more than `threshold` IoU."""
  kept: list[Detection] = []
  for d in sorted(dets, key=lambda d: -d.score):
    if all(iou(d.box, k.box) <= threshold for k in kept):
      kept.append(d)
  return kept


class HaarFaceDetector:
  """OpenCV Haar-cascade face detector (models from the opencv-python-headless wheel)."""

  name = "opencv-haar-cascades"

  def __init__(
    self,
    *,
    max_side: int = 640,
    min_face: float = 0.06,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    profiles: bool = True,
  ):
    """Loads the cascades.

    Args:
      max_side: frames are shrunk so that their longer side is at most this (speed).
      min_face: the smallest face side searched for, as a fraction of the frame's shorter side.
      scale_factor: the cascade's image pyramid step (smaller = slower, finds more).
      min_neighbors: overlapping raw hits needed to accept a face (larger = fewer false alarms).
      profiles: also search for faces in profile where no frontal face is found.
    """
    import cv2  # pylint: disable=g-import-not-at-top

    self._cv2 = cv2
    self.max_side = max_side
    self.min_face = min_face
    self.scale_factor = scale_factor
    self.min_neighbors = min_neighbors
    self._frontal = self._load(FRONTAL_CASCADE)
    self._profile = self._load(PROFILE_CASCADE) if profiles else None

  def _load(self, name: str):
    cv2 = self._cv2
    # OpenCV 5 dropped the cascade classifier and its data files from the main wheels.
    need = "opencv-python-headless>=4.10,<5 (its wheel ships the Haar cascade files)"
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
      raise RuntimeError(
        f"OpenCV {cv2.__version__} has no Haar cascade face detector: install "
        f"{need}, or use --face=none"
      )
    path = cv2.data.haarcascades + name
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
      raise RuntimeError(
        f"cannot load the OpenCV cascade {path}: install {need}, or use --face=none"
      )
    return cascade

  def _run(self, cascade, grey: np.ndarray, min_side: int) -> list[tuple[np.ndarray, float]]:
    rects, _, weights = cascade.detectMultiScale3(
      grey,
      scaleFactor=self.scale_factor,
      minNeighbors=self.min_neighbors,
      minSize=(min_side, min_side),
      outputRejectLevels=True,
    )
    return [
      (np.array([x, y, x + w, y + h], np.float64), float(s))
      for (x, y, w, h), s in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))
    ]

  def __call__(self, rgb: np.ndarray) -> list[Detection]:
    """Faces in one (H, W, 3) uint8 RGB frame, in frame pixels."""
    cv2 = self._cv2
    h, w = rgb.shape[:2]
    scale = min(1.0, self.max_side / max(h, w))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
      grey = cv2.resize(
        grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
      )
    min_side = max(20, int(self.min_face * min(grey.shape)))
    found = self._run(self._frontal, grey, min_side)
    if not found and self._profile is not None:
      found = self._run(self._profile, grey, min_side)
      gw = grey.shape[1]
      for box, s in self._run(self._profile, np.ascontiguousarray(grey[:, ::-1]), min_side):
        found.append((np.array([gw - box[2], box[1], gw - box[0], box[3]]), s))
    return non_max_suppression([Detection(box / scale, s) for box, s in found])


@dataclasses.dataclass
class Track:
  """One face over time: its detections (times ascending) and smoothed boxes."""

  times: list[float] = dataclasses.field(default_factory=list)
  boxes: list[np.ndarray] = dataclasses.field(default_factory=list)
  scores: list[float] = dataclasses.field(default_factory=list)

  def add(self, t: float, det: Detection) -> None:
    self.times.append(t)
    self.boxes.append(det.box)
    self.scores.append(det.score)

  @property
  def start(self) -> float:
    return self.times[0]

  @property
  def end(self) -> float:
    return self.times[-1]

  @property
  def weight(self) -> float:
    """Sum of the box sides: large and persistent faces rank first."""
    return float(sum(_side(b) for b in self.boxes))

  def predicted_box(self, t: float, horizon_s: float) -> np.ndarray:
    """Where the face should be at t > end: its latest box moved at its recent velocity (over up
    to three detections), extrapolated at most `horizon_s` ahead."""
    last = self.boxes[-1]
    j = max(0, len(self.times) - 3)
    span = self.times[-1] - self.times[j]
    if span <= 0:
      return last
    velocity = (last - self.boxes[j]) / span
    return last + velocity * min(max(t - self.times[-1], 0.0), horizon_s)

  def box_at(self, t: float, sigma_s: float) -> np.ndarray:
    """The smoothed box at time t: Gaussian-weighted mean of the detections (sigma in s)."""
    times = np.asarray(self.times)
    d2 = (times - t) ** 2
    # Weights relative to the nearest detection, so that far times don't underflow to 0 / 0.
    w = np.exp(-(d2 - d2.min()) / (2.0 * max(sigma_s, 1e-6) ** 2))
    return (w[:, None] * np.stack(self.boxes)).sum(0) / w.sum()

  def seen_near(self, start: float, end: float, tolerance_s: float) -> bool:
    """Whether a detection falls in [start - tolerance, end + tolerance]."""
    times = np.asarray(self.times)
    return bool(np.any((times >= start - tolerance_s) & (times <= end + tolerance_s)))


def _matches(expected: np.ndarray, box: np.ndarray, min_iou: float) -> float:
  """How well a detection continues a track whose face is expected at `expected` (higher is
  better), or -1 when it does not."""
  overlap = iou(expected, box)
  if overlap >= min_iou:
    return 1.0 + overlap
  # Motion the velocity did not foresee: near enough relative to the face's size.
  reach = 0.25 * (_side(expected) + _side(box))
  dist = _centre_distance(expected, box)
  return 1.0 - dist / reach if dist <= reach else -1.0


def track_faces(
  observations: Sequence[tuple[float, Sequence[Detection]]],
  *,
  max_gap_s: float = 1.0,
  min_iou: float = 0.2,
) -> list[Track]:
  """Links per-frame detections into tracks.

  Args:
    observations: (time, detections) of each examined frame, times ascending.
    max_gap_s: a track takes no detection more than this after its latest one.
    min_iou: the overlap that links a detection to a track (or joins two fragments).

  Returns:
    All tracks, fragments joined, ordered by start time.
  """
  tracks: list[Track] = []
  active: list[Track] = []  # tracks that may still take a detection
  for t, dets in observations:
    active = [tr for tr in active if t - tr.end <= max_gap_s]
    pairs = []
    for k, tr in enumerate(active):
      if tr.end >= t:
        continue
      expected = tr.predicted_box(t, max_gap_s)
      for j, d in enumerate(dets):
        m = _matches(expected, d.box, min_iou)
        if m >= 0:
          pairs.append((m, k, j))
    used_tracks, used_dets = set(), set()
    for _, k, j in sorted(pairs, key=lambda p: -p[0]):
      if k not in used_tracks and j not in used_dets:
        active[k].add(t, dets[j])
        used_tracks.add(k)
        used_dets.add(j)
    for j, d in enumerate(dets):
      if j not in used_dets:
        tr = Track()
        tr.add(t, d)
        tracks.append(tr)
        active.append(tr)
  return _join_fragments(tracks, min_iou, max_gap_s)


def _join_fragments(tracks: list[Track], min_iou: float, horizon_s: float) -> list[Track]:
  """One pass in order of start time: each fragment continues the chain that ended before it
  began, most recently, and was heading where it begins; else it starts a chain."""
  chains: list[Track] = []
  for b in sorted(tracks, key=lambda tr: tr.start):
    fits = [
      a
      for a in chains
      if a.end < b.start and _matches(a.predicted_box(b.start, horizon_s), b.boxes[0], min_iou) >= 0
    ]
    if fits:
      a = max(fits, key=lambda tr: tr.end)
      a.times += b.times
      a.boxes += b.boxes
      a.scores += b.scores
    else:
      chains.append(b)
  return chains


def select_tracks(tracks: Sequence[Track], *, num_examined: int, all_faces: bool) -> list[Track]:
  """Drops tracks seen on too few frames (false alarms), then keeps the main face (the largest
  `weight`) or, with `all_faces`, every remaining track by decreasing weight.

  A track must be seen on at least 10% of the examined frames, capped to 3 frames (and at least
  1), so short inputs with few examined frames keep their faces.
  """
  need = max(1, min(3, math.ceil(0.1 * num_examined)))
  kept = sorted((tr for tr in tracks if len(tr.times) >= need), key=lambda tr: -tr.weight)
  return kept if all_faces else kept[:1]


def square_crop_box(
  box: np.ndarray, margin: float, width: int, height: int
) -> tuple[int, int, int, int]:
  """A square around `box` with `margin` x its side added on every side, moved inside the frame
  where it fits (else centred on the face; `PIL.Image.crop` pads the outside black)."""
  side = max(box[2] - box[0], box[3] - box[1]) * (1.0 + 2.0 * margin)
  side = max(int(round(side)), 1)
  cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0

  def place(centre: float, limit: int) -> int:
    lo = int(round(centre - side / 2.0))
    if side <= limit:
      lo = min(max(lo, 0), limit - side)
    return lo

  x0, y0 = place(cx, width), place(cy, height)
  return x0, y0, x0 + side, y0 + side
