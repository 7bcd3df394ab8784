"""Clip source over a packed (array_record) dataset written by `tfds_builders`.

    source = packed_source('/data/tfds', 'dfew/fold1', 'train')
    record = source[0]  # {'clip_id', 'label', 'num_frames', 'frames': list[bytes], 'origin'}

Records are read with `tfds.data_source` (random access, no TensorFlow) and follow the
record interface of the frame-folder source, with `frames` holding encoded JPEG bytes.
Record i is line i of the annotation list the dataset was built from.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import tensorflow_datasets as tfds

_NAME = re.compile(r"[a-z0-9_]+(/[a-z0-9_]+)?")


class PackedSource:
  """Random-access clip source over one split of a packed dataset (picklable)."""

  def __init__(self, data_dir: str | os.PathLike, name: str, split: str):
    if not _NAME.fullmatch(name):
      raise ValueError(
        f'expected a packed dataset name "<dataset>/<config>" such as '
        f'"dfew/fold1" (or "<dataset>" for its default config), got {name!r}'
      )
    self.data_dir = os.fspath(data_dir)
    self.name = name
    self.split = split
    self._labels: list[int] | None = None
    self._open()

  def _open(self) -> None:
    folder = pathlib.Path(self.data_dir) / self.name
    if not any(folder.glob("**/dataset_info.json")):
      raise FileNotFoundError(
        f"packed dataset {self.name} not found in {self.data_dir} (no dataset_info.json "
        f"under {folder}); "
        f"build it with: python -m dfer_clip_jax.data.build --dataset="
        f"{self.name.split('/')[0]} --manual_dir=... --data_dir={self.data_dir}"
      )
    # download=False: a missing dataset is an error here, never an implicit build.
    self._source = tfds.data_source(
      self.name, data_dir=self.data_dir, split=self.split, download=False
    )
    self.class_names: tuple[str, ...] = tuple(self._source.dataset_info.features["label"].names)

  def __getstate__(self) -> dict[str, Any]:
    # The open array_record readers stay behind; a worker process reopens the files.
    return {
      "data_dir": self.data_dir,
      "name": self.name,
      "split": self.split,
      "_labels": self._labels,
    }

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    i = int(index)
    if not -n <= i < n:
      raise IndexError(f"record {index} out of range: {self.name} {self.split} has {n} clips")
    i %= n
    rec = self._source[i]
    frames = list(rec["frames"])
    return {
      "clip_id": rec["clip_id"].decode("utf-8"),
      "label": int(rec["label"]),
      "num_frames": int(rec["num_frames"]),
      "frames": frames,
      "origin": f"{self.data_dir}/{self.name}:{self.split}[{i}]",
    }

  @property
  def labels(self) -> list[int]:
    """Labels of all clips, in order (from the build's metadata; else read once, cached)."""
    if self._labels is None:
      stored = self._source.dataset_info.metadata or {}
      labels = stored.get("labels", {}).get(self.split)
      if labels is None or len(labels) != len(self):
        labels = [int(self._source[i]["label"]) for i in range(len(self))]
      self._labels = [int(x) for x in labels]
    return list(self._labels)

  def __repr__(self) -> str:
    return f"PackedSource({self.data_dir!r}, {self.name!r}, {self.split!r}, {len(self)} clips)"


def packed_source(data_dir: str | os.PathLike, name: str, split: str) -> PackedSource:
  """The clips of `split` ('train' / 'test') of packed dataset `name` ('dfew/fold1')."""
  return PackedSource(data_dir, name, split)
