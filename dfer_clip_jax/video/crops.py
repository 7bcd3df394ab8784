"""From a video to face crops, shared by prediction (`predict.py`) and dataset preparation
(`data/prepare.py`), so that a model is trained on the crops it will be shown.

`scan` reads every frame's time and runs the face detector on about `detect_fps` frames per
second; `find_tracks` links those detections into face tracks and keeps the main face (or every
face); `crop_box_at` gives a track's smoothed face box and its square crop box at any time; and
`crop_frame` cuts a frame to that box and resizes it like the evaluation frames.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags
from PIL import Image

from dfer_clip_jax.data import augment
from dfer_clip_jax.video import faces as faces_lib
from dfer_clip_jax.video import sources


@dataclasses.dataclass(frozen=True)
class FaceOptions:
  """How faces are found, followed and cropped (the CLI flags of the same names)."""

  face: str = "auto"  # auto: detect and crop faces; none: whole frames
  detect_fps: float = 5.0
  margin: float = 0.25
  min_face: float = 0.06
  smooth_s: float = 0.3
  max_gap_s: float = 1.0

  def __post_init__(self):
    if self.face not in ("auto", "none"):
      raise ValueError(f"face={self.face!r}: expected 'auto' or 'none'")
    for name in ("detect_fps", "smooth_s", "max_gap_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.margin < 0:
      raise ValueError(f"--margin must be >= 0, got {self.margin}")
    if not 0 < self.min_face <= 1:
      raise ValueError(f"--min_face must be in (0, 1], got {self.min_face}")

  def detector(self) -> faces_lib.HaarFaceDetector | None:
    """A face detector for these options (None for whole frames)."""
    return faces_lib.HaarFaceDetector(min_face=self.min_face) if self.face == "auto" else None


DEFAULTS = FaceOptions()


def define_flags(fv: flags.FlagValues) -> None:
  """The face flags (FaceOptions' fields), one definition for every CLI that crops faces."""
  flags.DEFINE_enum(
    "face",
    DEFAULTS.face,
    ["auto", "none"],
    "auto: detect and crop faces; none: whole frames (already-cropped inputs)",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "detect_fps",
    DEFAULTS.detect_fps,
    "frames per second examined by the face detector",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "margin",
    DEFAULTS.margin,
    "crop margin on each side, as a fraction of the face box side",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "min_face",
    DEFAULTS.min_face,
    "smallest face searched for, as a fraction of the frame's shorter side",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "smooth_s", DEFAULTS.smooth_s, "time scale (s) of the face box smoothing", flag_values=fv
  )
  flags.DEFINE_float(
    "max_gap_s",
    DEFAULTS.max_gap_s,
    "a face missed for longer starts a gap (no face there)",
    flag_values=fv,
  )


def options_from_flags(args) -> FaceOptions:
  """FaceOptions from parsed flags (raises ValueError for a bad value)."""
  return FaceOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FaceOptions)})


def scan(
  reader: sources.FrameReader, detector: faces_lib.HaarFaceDetector | None, detect_fps: float
) -> tuple[np.ndarray, list]:
  """One reading pass: every frame's time, and the faces on about `detect_fps` frames per second
  (none when `detector` is None).

  Returns:
    (frame times (N,) in s, [(time, detections)] of the examined frames).
  """
  next_detect = [0.0]

  def detect_here(_, t: float) -> bool:
    if detector is None or t < next_detect[0] - 1e-6:
      return False
    next_detect[0] = t + 1.0 / detect_fps
    return True

  times, observations = [], []
  for rec in reader.frames(detect_here):
    times.append(rec.time)
    if rec.rgb is not None:
      observations.append((rec.time, detector(rec.rgb)))
  return np.asarray(times, np.float64), observations


def find_tracks(
  path: str | os.PathLike,
  observations,
  *,
  max_gap_s: float,
  min_face: float,
  all_faces: bool = False,
) -> list[faces_lib.Track]:
  """The main face track (or, with `all_faces`, every track) of an input's detections.

  Raises:
    sources.InputError: no face track (saying what the detector saw and what to try).
  """
  tracks = faces_lib.select_tracks(
    faces_lib.track_faces(observations, max_gap_s=max_gap_s),
    num_examined=len(observations),
    all_faces=all_faces,
  )
  if not tracks:
    found = sum(len(d) for _, d in observations)
    detail = (
      f"{found} isolated detections were dropped as false alarms"
      if found
      else "nothing was detected"
    )
    raise sources.InputError(
      f"{path}: no face found in the {len(observations)} frames examined ({detail}; "
      f"faces smaller than {min_face:.0%} of the frame's shorter side are not "
      "searched for, see --min_face). If the input is already cropped to the face, use "
      "--face=none"
    )
  return tracks


def crop_box_at(
  track: faces_lib.Track, t: float, *, smooth_s: float, margin: float, width: int, height: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """(smoothed face box (4,), square crop box) of `track` at time `t` in a width x height frame."""
  box = track.box_at(t, smooth_s)
  return box, faces_lib.square_crop_box(box, margin, width, height)


def crop_frame(rgb: np.ndarray, box: tuple[int, int, int, int] | None, size: int) -> np.ndarray:
  """A frame (H, W, 3) cut to `box` (None: the whole frame) and resized like the evaluation
  frames -> (size, size, 3) uint8. Parts of the box outside the frame come out black."""
  image = Image.fromarray(rgb, "RGB")
  region = image if box is None else image.crop(box)
  return augment.test_transform([region], size=size)[0]
