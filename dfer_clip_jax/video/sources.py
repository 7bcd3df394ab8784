"""Inputs of the prediction CLI: video files (decoded by PyAV) and folders of frames.

`discover_inputs` turns the user's arguments (paths, folders, globs) into a list of inputs; a
`FrameReader` (`open_input`) walks one input's frames in presentation order with their
timestamps in seconds from the first frame. Frames are converted to RGB arrays only when the
caller selects them, so a pass that only needs timestamps, or every fifth frame, stays cheap.

Timestamps come from the video's presentation times (variable frame rates are kept as they
are; times that go backwards in a damaged file are repaired and counted). A folder of frames has
no times: frame i is at i / fps. Phone videos stored sideways with a display rotation are turned
upright, as players show them.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dfer_clip_jax.data import annotations as annotations_lib
from dfer_clip_jax.data import augment
from dfer_clip_jax.video import windows as windows_lib

VIDEO_EXTENSIONS = frozenset(
  {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
)
IMAGE_EXTENSIONS = annotations_lib.IMAGE_EXTENSIONS
VIDEO = "video"
FRAMES = "frames"


class InputError(Exception):
  """One input cannot be used (unreadable, corrupt, empty, no face, ...); others go on."""


@dataclasses.dataclass(frozen=True)
class InputItem:
  """One input to predict on: a video file or a folder of frames."""

  path: pathlib.Path
  kind: str  # VIDEO or FRAMES


@dataclasses.dataclass
class Discovered:
  items: list[InputItem]
  problems: list[tuple[str, str]]  # (argument, why it gave no input)


def _is_video(path: pathlib.Path) -> bool:
  return path.suffix.lower() in VIDEO_EXTENSIONS


def _has_frames(folder: pathlib.Path) -> bool:
  try:
    return bool(annotations_lib.list_frames(folder))
  except OSError:
    return False


def _items_of_folder(folder: pathlib.Path) -> list[InputItem]:
  """A frame folder is one input; else its videos, and its sub-folders that hold frames."""
  if _has_frames(folder):
    return [InputItem(folder, FRAMES)]
  items = []
  for child in sorted(folder.iterdir()):
    if child.name.startswith("."):
      continue
    if child.is_file() and _is_video(child):
      items.append(InputItem(child, VIDEO))
    elif child.is_dir() and _has_frames(child):
      items.append(InputItem(child, FRAMES))
  return items


def _items_of_path(path: pathlib.Path, explicit: bool) -> list[InputItem]:
  if path.is_dir():
    return _items_of_folder(path)
  if path.is_file() and (explicit or _is_video(path)):
    # A file named explicitly is tried whatever its extension: the decoder decides.
    return [InputItem(path, VIDEO)]
  return []


def discover_inputs(arguments: Sequence[str]) -> Discovered:
  """Expands paths, folders and glob patterns into inputs (each once, in argument order).

  A folder holding image files is one frame-folder input; a folder of videos (and/or of frame
  sub-folders, like a dataset's clip folders) gives one input per video / sub-folder. A glob's
  matches are taken the same way; its files must have a video extension.
  """
  items: list[InputItem] = []
  problems: list[tuple[str, str]] = []
  seen: set[pathlib.Path] = set()
  for arg in arguments:
    path = pathlib.Path(arg).expanduser()
    if path.exists():
      found = _items_of_path(path, explicit=True)
      if not found:
        problems.append(
          (
            arg,
            f"the folder {path} holds no video files ("
            f"{', '.join(sorted(VIDEO_EXTENSIONS))}) and no image frames",
          )
        )
    elif glob.has_magic(arg):
      matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
      found = [it for m in matches for it in _items_of_path(pathlib.Path(m), explicit=False)]
      if not found:
        problems.append((arg, "the pattern matches no video file or frame folder"))
    else:
      problems.append((arg, f"{path} does not exist"))
      found = []
    for it in found:
      key = it.path.resolve()
      if key not in seen:
        seen.add(key)
        items.append(it)
  return Discovered(items, problems)


@dataclasses.dataclass
class FrameRecord:
  """One frame: its index in presentation order, its time (s) and, when selected, RGB pixels."""

  index: int
  time: float
  rgb: np.ndarray | None  # (H, W, 3) uint8, upright


@dataclasses.dataclass
class InputInfo:
  """What a reading pass learned about an input (recorded in predictions.json)."""

  path: str
  kind: str
  width: int = 0  # upright (after the display rotation)
  height: int = 0
  num_frames: int = 0
  duration_s: float = 0.0
  average_fps: float = 0.0
  variable_frame_rate: bool = False
  codec: str | None = None
  container: str | None = None
  rotation: int = 0
  repaired_timestamps: int = 0
  timestamps_from: str = "presentation times"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
  """Applies a display rotation (degrees counter-clockwise, as PyAV's `VideoFrame.rotation`
  gives it; players turn the frame by its opposite) to stored pixels (H, W, 3)."""
  k = int(round(rotation / 90.0)) % 4
  # np.rot90 turns counter-clockwise for k > 0; a stored -90 is shown turned clockwise.
  return np.ascontiguousarray(np.rot90(rgb, k=k)) if k else rgb


def frame_duration(times: np.ndarray, fallback: float) -> float:
  """A typical frame duration: the median gap between frames (robust to a few dropped ones)."""
  if len(times) < 2:
    return fallback
  gaps = np.diff(times)
  gaps = gaps[gaps > 0]
  return float(np.median(gaps)) if len(gaps) else fallback


class FrameReader(abc.ABC):
  """Reads one input's frames in presentation order; see `open_input`."""

  info: InputInfo

  @abc.abstractmethod
  def frames(self, select: Callable[[int, float], bool] | None = None) -> Iterator[FrameRecord]:
    """Every frame with its index and time; pixels only where `select(index, time)` is true
    (all frames when `select` is None).

    Raises:
      InputError: the input cannot be opened or decoded (naming the file and frame).
    """


class VideoFileReader(FrameReader):
  """A video file decoded with PyAV (FFmpeg): the first video stream, frames as presented."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.info = InputInfo(path=str(self.path), kind=VIDEO)

  def _open(self):
    import av  # pylint: disable=g-import-not-at-top

    try:
      container = av.open(str(self.path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
      raise InputError(f"{self.path}: cannot open it as a video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
      container.close()
      raise InputError(f"{self.path}: the file has no video stream")
    return container

  def frames(self, select=None):
    import av  # pylint: disable=g-import-not-at-top

    container = self._open()
    try:
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      nominal_fps = float(rate) if rate else 25.0
      info = self.info
      info.codec = stream.codec_context.name
      info.container = container.format.name
      first, last = None, None
      index, repaired = 0, 0
      times: list[float] = []
      try:
        for frame in container.decode(stream):
          t = frame.time
          if t is None:
            # No presentation time (some raw streams): count frames at the nominal rate.
            t = (first or 0.0) + index / nominal_fps
          if first is None:
            first = t
            info.rotation = int(getattr(frame, "rotation", 0) or 0)
          t -= first
          if last is not None and t <= last:
            repaired += 1
            t = last + 1.0 / nominal_fps
          last = t
          times.append(t)
          rgb = None
          if select is None or select(index, t):
            rgb = upright(frame.to_ndarray(format="rgb24"), info.rotation)
          if index == 0:
            w, h = frame.width, frame.height
            info.width, info.height = (h, w) if info.rotation % 180 else (w, h)
          yield FrameRecord(index, t, rgb)
          index += 1
      except av.error.FFmpegError as e:
        raise InputError(
          f"{self.path}: decoding failed after {index} frames ({type(e).__name__}: {e})"
        ) from e
      if index == 0:
        raise InputError(f"{self.path}: the video stream holds no decodable frame")
      arr = np.asarray(times)
      info.num_frames = index
      info.repaired_timestamps = repaired
      step = frame_duration(arr, 1.0 / nominal_fps)
      info.duration_s = float(arr[-1] + step)
      info.average_fps = index / info.duration_s
      info.variable_frame_rate = not windows_lib.is_constant_rate(arr)
    finally:
      container.close()


class FrameFolderReader(FrameReader):
  """A folder of image files, sorted by name, at a fixed frame rate (frame i at i / fps)."""

  def __init__(self, path: str | os.PathLike, fps: float):
    if fps <= 0:
      raise ValueError(f"fps must be positive, got {fps}")
    self.path = pathlib.Path(path)
    self.fps = fps
    try:
      self.files = annotations_lib.list_frames(self.path)
    except OSError as e:
      raise InputError(f"{self.path}: cannot list the frame folder ({e})") from e
    if not self.files:
      raise InputError(
        f"{self.path}: the folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
      )
    n = len(self.files)
    self.info = InputInfo(
      path=str(self.path),
      kind=FRAMES,
      num_frames=n,
      duration_s=n / fps,
      average_fps=fps,
      timestamps_from=f"frame index / {fps:g} fps (--fps)",
    )

  def _read(self, index: int) -> np.ndarray:
    try:
      (im,) = augment.decode_frames(self.files, [index])
    except augment.FrameError as e:
      raise InputError(f"{self.path}: {e}") from e
    size = (self.info.width, self.info.height)
    if size == (0, 0):
      self.info.width, self.info.height = im.size
    elif im.size != size:
      raise InputError(
        f"{self.files[index]}: frame size {im.size[0]}x{im.size[1]} differs from "
        f"the first read frame's {size[0]}x{size[1]}"
      )
    return np.asarray(im)

  def frames(self, select=None):
    if self.info.width == 0:
      self._read(0)  # sizes are known before any frame is yielded
    for i in range(len(self.files)):
      t = i / self.fps
      rgb = self._read(i) if select is None or select(i, t) else None
      yield FrameRecord(i, t, rgb)


def open_input(item: InputItem, *, fps: float = 25.0) -> FrameReader:
  """A reader for `item`; `fps` is the frame rate of frame folders (videos carry their own)."""
  if item.kind == FRAMES:
    return FrameFolderReader(item.path, fps)
  return VideoFileReader(item.path)
