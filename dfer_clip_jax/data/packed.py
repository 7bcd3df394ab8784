"""Clip source over a packed dataset written by `tfds_builders` (layout 2.0.0).

    source = packed_source('/data/tfds', 'dfew/fold1', 'train')
    record = source[0]  # {'clip_id', 'label', 'num_frames', 'frames', 'origin'}
    jpeg = record['frames'][5]  # reads frame 5's bytes, and only those

Layout (per split, in the dataset's version folder `<data_dir>/<name>/2.0.0/`, next to
tfds' own files):
  <split>.frames           every frame's encoded JPEG bytes, clip after clip, back to back.
  <split>.frame_table.npy  one row per frame: (offset, size, crc32) of its bytes in the blob.
  <split>.clip_table.npz   one row per clip: clip_id, label, num_frames, first_frame (row of
                           its first frame in the frame table; first_frame[-1] = frame count).
  tfds' array_record       one small record per clip: clip_id, label, num_frames and where its
                           frames are (frame_offset, frame_sizes), for tfds readers.

Why: a training sample decodes 16 of a clip's ~90 frames. A record holding all of a clip's
frames made every sample read the whole clip (5-6x the bytes it needs, which is what counts
on a network file system or a bucket mount). Here `frames[k]` is one `os.pread` of frame k's
bytes, read only when accessed; its crc32 is checked, so a corrupt or truncated blob stops
with the file, the clip and the frame named instead of decoding garbage.

The tables open without reading any frame (the frame table is memory-mapped, so worker
processes share its pages). tfds is imported only to open a dataset (its dataset_info: class
names, split sizes); a `PackedSource` unpickled in a worker process reads with numpy and
`os.pread` alone, without importing tfds, grain or JAX, and opens its files on first use
(file descriptors do not pickle; a pread on a shared descriptor is thread-safe).

Builds of layout 1.0.0 (one record per clip holding every frame) are not read: opening one
raises `PackedDataError` naming the folder and the command that rebuilds it.
Record i is line i of the annotation list the dataset was built from.
"""

from __future__ import annotations

import collections.abc
import operator
import os
import pathlib
import re
import threading
import zlib
from typing import Any

import numpy as np

# The builders' tfds VERSION (tfds_builders.py): the layout this module reads and writes.
LAYOUT_VERSION = "2.0.0"
_NAME = re.compile(r"[a-z0-9_]+(/[a-z0-9_]+)?")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_CONFIG = re.compile(r"(?P<base>.+?)(?:_short(?P<short>\d+))?(?:_q(?P<q>\d+))?")
FRAME_TABLE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<u4"), ("crc32", "<u4")])


class PackedDataError(ValueError):
  """A packed dataset that cannot be read: old layout, missing, truncated or corrupt files."""


def blob_path(folder: str | os.PathLike, split: str) -> pathlib.Path:
  return pathlib.Path(folder) / f"{split}.frames"


def frame_table_path(folder: str | os.PathLike, split: str) -> pathlib.Path:
  return pathlib.Path(folder) / f"{split}.frame_table.npy"


def clip_table_path(folder: str | os.PathLike, split: str) -> pathlib.Path:
  return pathlib.Path(folder) / f"{split}.clip_table.npz"


def rebuild_command(data_dir: str | os.PathLike, name: str) -> str:
  """The `data.build` command that builds packed dataset `name` ('dfew/fold1_short224')."""
  dataset, _, config = name.partition("/")
  cmd = f"python -m dfer_clip_jax.data.build --dataset={dataset}"
  if config:
    m = _CONFIG.fullmatch(config)
    cmd += f" --config={m['base']}"
    if m["short"]:
      cmd += f" --resize_short_side={m['short']}"
    if m["q"]:
      cmd += f" --jpeg_quality={m['q']}"
  return cmd + f" --manual_dir=MANUAL_DIR --data_dir={os.fspath(data_dir)}"


class FramesWriter:
  """Writes one split's blob and tables (the builders run it inside tfds' temporary folder,
  which tfds renames only when the whole build succeeded)."""

  def __init__(self, folder: str | os.PathLike, split: str):
    self._folder, self._split = pathlib.Path(folder), split
    self._blob = open(blob_path(folder, split), "wb")  # noqa: SIM115 -- closed in close().
    self._offset = 0
    self._frames: list[tuple[int, int, int]] = []
    self._clip_ids: list[str] = []
    self._labels: list[int] = []
    self._first: list[int] = [0]

  def add(self, clip_id: str, label: int, frames: collections.abc.Sequence[bytes]) -> int:
    """Appends a clip's frames; returns the blob offset of its first frame."""
    start = self._offset
    for data in frames:
      self._blob.write(data)
      self._frames.append((self._offset, len(data), zlib.crc32(data)))
      self._offset += len(data)
    self._clip_ids.append(clip_id)
    self._labels.append(int(label))
    self._first.append(len(self._frames))
    return start

  def abort(self) -> None:
    """Closes the blob without writing the tables (the build failed)."""
    self._blob.close()

  def close(self) -> None:
    """Flushes the blob, then writes the tables (a reader checks the blob against them)."""
    self._blob.flush()
    os.fsync(self._blob.fileno())
    self._blob.close()
    np.save(frame_table_path(self._folder, self._split), np.array(self._frames, FRAME_TABLE_DTYPE))
    first = np.array(self._first, np.int64)
    with open(clip_table_path(self._folder, self._split), "wb") as f:
      np.savez(
        f,
        clip_id=np.array(self._clip_ids, dtype=str),
        label=np.array(self._labels, np.int32),
        num_frames=np.diff(first).astype(np.int32),
        first_frame=first,
      )


def _find_build(data_dir: str | os.PathLike, name: str) -> pathlib.Path:
  """The newest version folder of `name`; raises for a missing or old-layout dataset."""
  folder = pathlib.Path(data_dir) / name
  build_cmd = rebuild_command(data_dir, name)
  config_dirs = [folder]
  if "/" not in name and folder.is_dir():  # "<dataset>": its only config, as tfds would.
    config_dirs += sorted(p for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")

  def versions(d: pathlib.Path) -> list[pathlib.Path]:
    found = [p for p in d.glob("*/dataset_info.json") if _VERSION.fullmatch(p.parent.name)]
    return sorted((p.parent for p in found), key=lambda p: tuple(map(int, p.name.split("."))))

  found = {d: v for d in config_dirs if (v := versions(d))}
  if not found:
    raise FileNotFoundError(
      f"packed dataset {name} not found in {os.fspath(data_dir)} (no <version>/"
      f"dataset_info.json under {folder}); build it with: {build_cmd}"
    )
  if len(found) > 1:
    raise ValueError(
      f"{folder} holds several configs ({', '.join(d.name for d in found)}): name one, "
      f'e.g. "{name}/{next(iter(found)).name}"'
    )
  newest = next(iter(found.values()))[-1]
  major = int(newest.name.split(".")[0])
  if major < int(LAYOUT_VERSION.split(".")[0]):
    raise PackedDataError(
      f"{newest} is a packed dataset of layout {newest.name} (one record per clip holding "
      f"every frame), which this version no longer reads: rebuild it (layout "
      f"{LAYOUT_VERSION}, a sample reads only its frames) with\n  {build_cmd}\n(MANUAL_DIR: "
      f"the folder it was built from). The rebuild is written next to it; delete {newest} "
      f"afterwards."
    )
  if newest.name != LAYOUT_VERSION:
    raise PackedDataError(
      f"{newest} is a packed dataset of layout {newest.name}; this dfer_clip_jax reads "
      f"layout {LAYOUT_VERSION}: update dfer_clip_jax or rebuild it with\n  {build_cmd}"
    )
  return newest


class PackedFrames(collections.abc.Sequence):
  """A clip's frames: `frames[k]` reads frame k's JPEG bytes on first access (cached)."""

  def __init__(self, source: PackedSource, index: int, first: int, count: int):
    self._source, self._index, self._first, self._count = source, index, first, count
    # A loader asks for a frame more than once (its header, then its pixels): read it once.
    self._cache: dict[int, bytes] = {}

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, k):
    if isinstance(k, slice):
      return [self[j] for j in range(*k.indices(self._count))]
    k = operator.index(k)
    if not -self._count <= k < self._count:
      raise IndexError(f"frame {k} out of range: the clip has {self._count} frames")
    k %= self._count
    if k not in self._cache:
      self._cache[k] = self._source.read_frame(self._index, self._first + k, k)
    return self._cache[k]

  def __repr__(self) -> str:
    return f"PackedFrames(clip {self._index}, {self._count} frames)"


class PackedSource:
  """Random-access clip source over one split of a packed dataset (picklable)."""

  def __init__(self, data_dir: str | os.PathLike, name: str, split: str):
    if not _NAME.fullmatch(name):
      raise ValueError(
        f'expected a packed dataset name "<dataset>/<config>" such as '
        f'"dfew/fold1" (or "<dataset>" for its only config), got {name!r}'
      )
    self.data_dir = os.fspath(data_dir)
    self.name = name
    self.split = split
    self.folder = os.fspath(_find_build(data_dir, name))
    class_names, num_examples = _read_info(self.folder, split)
    self.class_names: tuple[str, ...] = class_names
    self._reset()
    # Checked now, in the parent, so that a broken build fails before any worker starts.
    self._tables()
    if len(self) != num_examples:
      raise PackedDataError(
        f"{clip_table_path(self.folder, split)} lists {len(self)} clips but tfds' "
        f"dataset_info says {num_examples}: the build is inconsistent; rebuild it with\n  "
        f"{rebuild_command(self.data_dir, self.name)}"
      )

  def _reset(self) -> None:
    self._lock = threading.Lock()
    self._fd: int | None = None
    self._clips: dict[str, np.ndarray] | None = None
    self._frame_table: np.ndarray | None = None

  def _broken(self, what: str) -> PackedDataError:
    return PackedDataError(
      f"{what}; the packed dataset {self.folder} is damaged: rebuild it with\n  "
      f"{rebuild_command(self.data_dir, self.name)}"
    )

  def _tables(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The clip table and the (memory-mapped) frame table, loaded on first use."""
    if self._clips is None:
      with self._lock:
        if self._clips is None:
          self._load_tables()
    return self._clips, self._frame_table

  def _load_tables(self) -> None:
    clip_path = clip_table_path(self.folder, self.split)
    frame_path = frame_table_path(self.folder, self.split)
    blob = blob_path(self.folder, self.split)
    for path in (clip_path, frame_path, blob):
      if not path.is_file():
        raise self._broken(f"{path} is missing")
    try:
      with np.load(clip_path) as z:
        clips = {k: z[k] for k in ("clip_id", "label", "num_frames", "first_frame")}
      frame_table = np.load(frame_path, mmap_mode="r")
    except Exception as e:  # numpy raises several types for a damaged file.
      raise self._broken(f"cannot read {clip_path} / {frame_path}: {e}") from e
    if frame_table.dtype != FRAME_TABLE_DTYPE or len(frame_table) != clips["first_frame"][-1]:
      raise self._broken(
        f"{frame_path} holds {len(frame_table)} frames of dtype {frame_table.dtype}, "
        f"{clip_path} expects {clips['first_frame'][-1]}"
      )
    if len(frame_table):
      end = int(frame_table[-1]["offset"]) + int(frame_table[-1]["size"])
      size = os.stat(blob).st_size
      if size != end:
        # Name the first clip the short blob cuts (truncated copy / interrupted sync).
        ends = frame_table["offset"].astype(np.int64) + frame_table["size"]
        row = int(np.searchsorted(ends, size, side="right"))
        clip = int(np.searchsorted(clips["first_frame"], row, side="right")) - 1
        raise self._broken(
          f"{blob} is {size} bytes, its frame table expects {end}"
          + (f" (clip {clips['clip_id'][clip]} is the first cut)" if size < end else "")
        )
    self._frame_table = frame_table
    self._clips = clips

  def read_frame(self, index: int, row: int, k: int) -> bytes:
    """The bytes of frame `row` of the frame table (frame k of clip `index`), checked."""
    _, table = self._tables()
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(blob_path(self.folder, self.split), os.O_RDONLY)
    offset, size, crc = (int(x) for x in table[row])
    data = os.pread(self._fd, size, offset)
    if len(data) == size and zlib.crc32(data) == crc:
      return data
    where = (  # Built only for the error: this runs for every frame a sample decodes.
      f"frame {k} of clip {self._clips['clip_id'][index]} ({self.name} {self.split}[{index}]) "
      f"at bytes {offset}..{offset + size} of {blob_path(self.folder, self.split)}"
    )
    if len(data) != size:
      raise self._broken(f"{where}: the file ends after {len(data)} of its {size} bytes")
    raise self._broken(f"{where}: corrupt (crc32 mismatch)")

  def close(self) -> None:
    """Closes the blob's descriptor (reopened on the next read)."""
    with self._lock:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # At interpreter exit the os module may be gone already.
      pass

  def __getstate__(self) -> dict[str, Any]:
    # Tables, descriptor and lock stay behind; a worker process reopens on first use.
    return {k: self.__dict__[k] for k in ("data_dir", "name", "split", "folder", "class_names")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return len(self._tables()[0]["label"])

  def __getitem__(self, index: int) -> dict[str, Any]:
    clips, _ = self._tables()
    n = len(clips["label"])
    i = operator.index(index)
    if not -n <= i < n:
      raise IndexError(f"record {index} out of range: {self.name} {self.split} has {n} clips")
    i %= n
    return {
      "clip_id": str(clips["clip_id"][i]),
      "label": int(clips["label"][i]),
      "num_frames": int(clips["num_frames"][i]),
      "frames": PackedFrames(self, i, int(clips["first_frame"][i]), int(clips["num_frames"][i])),
      "origin": f"{self.data_dir}/{self.name}:{self.split}[{i}]",
    }

  @property
  def labels(self) -> list[int]:
    """Labels of all clips, in order (from the clip table: no frame is read)."""
    return self._tables()[0]["label"].tolist()

  def __repr__(self) -> str:
    return f"PackedSource({self.data_dir!r}, {self.name!r}, {self.split!r}, {len(self)} clips)"


def _read_info(folder: str, split: str) -> tuple[tuple[str, ...], int]:
  """(class names, clip count of `split`) from tfds' dataset_info of a build."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top -- workers skip it.

  info = tfds.builder_from_directory(folder).info
  if split not in info.splits:
    raise ValueError(f"{folder} has no split {split!r} (it has {', '.join(info.splits)})")
  return tuple(info.features["label"].names), int(info.splits[split].num_examples)


def packed_source(data_dir: str | os.PathLike, name: str, split: str) -> PackedSource:
  """The clips of `split` ('train' / 'test') of packed dataset `name` ('dfew/fold1')."""
  return PackedSource(data_dir, name, split)
