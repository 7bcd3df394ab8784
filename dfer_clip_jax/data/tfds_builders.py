"""tensorflow-datasets builders that pack frame-folder datasets (a frames file per split + index).

Builders (registered with tfds on import): `dfew` (configs fold1..fold5), `ferv39k`
(config `default`), `mafw` (fold1..fold5) and `synthetic` (classes7, classes11). Build them
with `python -m dfer_clip_jax.data.build` and read them with
`dfer_clip_jax.data.packed.packed_source`.

Layout 2.0.0 (`packed.py` reads and writes it; see its docstring): per split, every frame's
encoded JPEG bytes are written once, back to back, into `<split>.frames` in the dataset's
version folder, with a frame table ((offset, size, crc32) per frame) and a clip table
(clip_id, label, num_frames, first frame), so that reading frame k of clip i reads only that
frame's bytes. The side files are written into tfds' temporary `*.incomplete*` folder, which
tfds renames only when every split was written: a killed build leaves nothing that looks
complete. tfds' own records (one per clip, in annotation-list order) hold the index only:
  label         ClassLabel with the class names of the dataset registry (`datasets.py`).
  clip_id       Text: the frame folder as written in the annotation list.
  num_frames    int32: the number of frames.
  frame_offset  int64: where the clip's first frame starts in `<split>.frames`.
  frame_sizes   Sequence(int64): the byte size of each frame (frames follow each other).
Layout 1.0.0 (records holding every frame's bytes: a sample read the whole clip) is not
read any more; `packed.PackedSource` names the rebuild command.

Why bytes: tfds' Image / Video features encode and decode through TensorFlow, which this
project does not depend on. The records hold numbers and text only, serialised by tfds' own
numpy example serializer, so building (array_record) and `tfds.data_source` reading both
run without TensorFlow (tfds 4.9 still needs `importlib_resources`).

Frames are stored as they are on disk when they are RGB JPEGs (no re-encoding, no quality
loss). Other formats and modes (PNG, grey, CMYK, 16-bit, ...) are converted to RGB as the
loader does and encoded as JPEG (quality `jpeg_quality`). With `resize_short_side=N` every
frame is resized (bilinear, aspect kept) so that its short side is N and re-encoded, unless
it already is an RGB JPEG of that size. Such a build gets its own config name
`<config>_short<N>` (e.g. `dfew/fold1_short224`), so both variants can share a data_dir.

Before writing anything, every split is checked with `validate.validate_clips` (folders,
frame counts, every image decoded, labels, duplicates; rgb_policy 'convert'): any error
stops the build with the full report.

Expected `manual_dir` layout (frame folders are the paths in the lists, relative to
`data_root`, which defaults to `manual_dir`; absolute paths are kept):

  dfew/foldK   annotation lists of the reference: `DFEW_set_K_train.txt`,
               `DFEW_set_K_test.txt` (the registry's one naming, `datasets.py`), in
               `manual_dir/annotation/`, `manual_dir/annotations/` or `manual_dir/`.
               Without lists, DFEW's official release is read: split files
               `EmoLabel_DataSplit/train(single-labeled)/set_K.csv` and
               `EmoLabel_DataSplit/test(single-labeled)/set_K.csv` (header
               `video_name,label`, labels 1..7 in DFEW's order = ours + 1) and frame folders
               `Clip/clip_224x224/<video_name as 5 digits>/` (or `clip_224x224/...`); the
               frame count is taken from the folder.
  ferv39k      `FERV39K_train.txt`, `FERV39K_test.txt`, same
               folders. (FERV39k's own `4_setups` csv files are not read: convert them to
               the reference's lists.)
  mafw/foldK   `MAFW_set_K_train.txt`, `MAFW_set_K_test.txt`, labels already in the
               reference's order (datasets.py).
  synthetic    the output folder of `python -m dfer_clip_jax.data.synthetic`: `train.txt`,
               `test.txt`, `synthetic.json` and `frames/`; config classes7 / classes11 must
               match the generated class count.
List names are matched case-insensitively. The reference's lists hold the authors'
absolute paths: absolute folders that do not exist are re-rooted under `data_root` by
their trailing components (`rebase_absolute`), so those lists work unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import multiprocessing
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dfer_clip_jax.data import annotations as annotations_lib
from dfer_clip_jax.data import augment, datasets, packed, synthetic, validate

DATASETS = ("dfew", "ferv39k", "mafw", "synthetic")
SPLITS = ("train", "test")
DEFAULT_JPEG_QUALITY = 95
# Shown by tfds when manual_dir is missing or empty.
_MANUAL_LAYOUT = "Expected `manual_dir` layout" + __doc__.split("Expected `manual_dir` layout")[1]


class ManualDirError(FileNotFoundError):
  """`manual_dir` lacks the files a builder needs; says what was looked for."""


class DatasetValidationError(ValueError):
  """The clips failed validation; the message is the full validation report."""


@dataclasses.dataclass(eq=False)
class ClipsConfig(tfds.core.BuilderConfig):
  """A builder config: which fold / class set, and how frames are stored.

  Attributes:
    fold: 1-based fold for DFEW / MAFW, None otherwise.
    num_classes: the synthetic builder's class count (7 or 11), None otherwise.
    resize_short_side: 0 keeps the frames' size; N resizes so the short side is N.
    jpeg_quality: JPEG quality of re-encoded frames.
  """

  fold: int | None = None
  num_classes: int | None = None
  resize_short_side: int = 0
  jpeg_quality: int = DEFAULT_JPEG_QUALITY


def config_name(base: str, resize_short_side: int = 0) -> str:
  """The config name of a build: `fold1`, or `fold1_short224` when resized."""
  return f"{base}_short{resize_short_side}" if resize_short_side else base


def make_config(
  builder_cls: type[_ClipsBuilder],
  base: str,
  *,
  resize_short_side: int = 0,
  jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> ClipsConfig:
  """A config of `builder_cls` derived from its predefined config `base`."""
  predefined = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  if base not in predefined:
    raise ValueError(
      f"{builder_cls.name} has no config {base!r}; choose one of {sorted(predefined)}"
    )
  if resize_short_side < 0:
    raise ValueError(f"resize_short_side must be >= 0, got {resize_short_side}")
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
  if not resize_short_side and jpeg_quality == DEFAULT_JPEG_QUALITY:
    return predefined[base]
  name = config_name(base, resize_short_side)
  if jpeg_quality != DEFAULT_JPEG_QUALITY:
    name += f"_q{jpeg_quality}"
  return dataclasses.replace(
    predefined[base],
    name=name,
    resize_short_side=resize_short_side,
    jpeg_quality=jpeg_quality,
    description=f"{predefined[base].description} Frames resized to short side "
    f"{resize_short_side}, JPEG quality {jpeg_quality}.",
  )


def encode_frames(
  paths: Sequence[str | os.PathLike],
  resize_short_side: int = 0,
  jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> list[bytes]:
  """The stored bytes of a clip's frames (see the module docstring for when it re-encodes)."""
  out = []
  for path in paths:
    data = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:  # Reads the header only.
      keep = (
        im.format == "JPEG"
        and im.mode == "RGB"
        and (not resize_short_side or min(im.size) == resize_short_side)
      )
    if keep:
      out.append(data)
      continue
    # The loader's decoding (RGB conversion, strict truncation checks).
    rgb = augment.decode_frames([data], [0])[0]
    if resize_short_side:
      w, h = rgb.size
      scale = resize_short_side / min(w, h)
      new = (max(1, round(w * scale)), max(1, round(h * scale)))
      new = (resize_short_side, new[1]) if w <= h else (new[0], resize_short_side)
      rgb = rgb.resize(new, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=jpeg_quality)
    out.append(buf.getvalue())
  return out


def _encode_task(task: tuple[list[str], int, int]) -> list[bytes]:
  paths, resize, quality = task
  return encode_frames(paths, resize, quality)


def _read_dfew_official(
  csv_path: pathlib.Path, manual_dir: pathlib.Path, data_root: pathlib.Path
) -> list[annotations_lib.ClipAnnotation]:
  """Reads one of DFEW's official split files into annotations (frame count from disk)."""
  clip_roots = [data_root / "Clip" / "clip_224x224", data_root / "clip_224x224"]
  clip_root = next((r for r in clip_roots if r.is_dir()), None)
  if clip_root is None:
    raise ManualDirError(
      f"{csv_path} is DFEW's official split file, but no frame folders were found at "
      f"{' or '.join(str(r) for r in clip_roots)} (expected <video_name as 5 digits>/"
      f"*.jpg under it)"
    )
  errors, clips = [], []
  with open(csv_path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    if "video_name" not in header or "label" not in header:
      raise ManualDirError(
        f"{csv_path}:1: expected a header with columns video_name and label, got {header}"
      )
    name_col, label_col = header.index("video_name"), header.index("label")
    for line_no, row in enumerate(reader, start=2):
      if not any(cell.strip() for cell in row):
        continue
      try:
        video, label = int(row[name_col]), int(row[label_col])
      except (ValueError, IndexError):
        errors.append(f"{csv_path}:{line_no}: expected integer video_name and label, got {row}")
        continue
      if not 1 <= label <= len(datasets.DFEW_CLASSES):
        errors.append(
          f"{csv_path}:{line_no}: label must be 1..{len(datasets.DFEW_CLASSES)} "
          f"(DFEW single-label), got {label}"
        )
        continue
      folder = clip_root / f"{video:05d}"
      if not folder.is_dir():
        errors.append(f"{csv_path}:{line_no}: frame folder {folder} does not exist")
        continue
      num_frames = len(annotations_lib.list_frames(folder))
      if num_frames == 0:
        errors.append(f"{csv_path}:{line_no}: frame folder {folder} holds no image files")
        continue
      clips.append(
        annotations_lib.ClipAnnotation(
          frame_dir=folder,
          num_frames=num_frames,
          label=label - 1,
          line_no=line_no,
          source=csv_path,
          clip_id=f"{video:05d}",
        )
      )
  if not clips and not errors:
    errors.append(f"{csv_path}: the split file holds no clips")
  if errors:
    raise DatasetValidationError("\n".join(errors))
  return clips


class _ClipsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: find the lists, validate, encode the frames of each clip."""

  VERSION = tfds.core.Version(packed.LAYOUT_VERSION)
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "2.0.0": "Frames move out of the records into one <split>.frames file per split, located "
    "by a frame table, so that a sample reads only the frames it decodes (1.0.0 read every "
    "frame of the clip). 1.0.0 builds must be rebuilt.",
  }
  DATASET: datasets.Dataset | None = None  # the registry entry: class names, list naming
  HOMEPAGE = ""
  DESCRIPTION = ""

  def __init__(
    self,
    *,
    data_root: str | os.PathLike | None = None,
    num_workers: int | None = None,
    check_images: bool = True,
    **kwargs,
  ):
    """Creates the builder.

    Args:
      data_root: root of relative frame folders in the lists (default: manual_dir).
      num_workers: processes encoding frames (None: all cores; 1: in this process).
        They are spawned: a calling script needs the `if __name__ == '__main__':` guard.
      check_images: validation decodes every frame (thorough, the slow part).
      **kwargs: tfds' arguments (data_dir, config, file_format, ...).
    """
    self._data_root = pathlib.Path(data_root) if data_root else None
    self._num_workers = num_workers
    self._check_images = check_images
    super().__init__(**kwargs)

  def _class_names(self) -> tuple[str, ...]:
    return self.DATASET.classes()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "label": tfds.features.ClassLabel(names=list(self._class_names())),
          "clip_id": tfds.features.Text(),
          "num_frames": tfds.features.Scalar(dtype=np.int32),
          "frame_offset": tfds.features.Scalar(dtype=np.int64),
          "frame_sizes": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        }
      ),
      # Records keep the annotation-list order, so record i is line i of the list.
      disable_shuffling=True,
      homepage=self.HOMEPAGE or None,
      metadata=tfds.core.MetadataDict(
        resize_short_side=self.builder_config.resize_short_side,
        jpeg_quality=self.builder_config.jpeg_quality,
      ),
    )

  def _split_annotations(
    self, manual_dir: pathlib.Path, data_root: pathlib.Path
  ) -> dict[str, list[annotations_lib.ClipAnnotation]]:
    """Annotations per split, read from `manual_dir`."""
    fold = self.builder_config.fold
    found = {split: self.DATASET.find_list(manual_dir, split, fold) for split in SPLITS}
    missing = [s for s in SPLITS if found[s] is None]
    if missing:
      wanted = "; ".join(self.DATASET.missing_list(manual_dir, s, fold) for s in missing)
      raise ManualDirError(
        f"{self.name}/{self.builder_config.name}: annotation lists not found: {wanted}. See "
        "the layout in dfer_clip_jax/data/tfds_builders.py and the README."
      )
    out = {}
    for split, path in found.items():
      clips, line_errors = annotations_lib.scan_annotations(
        path, data_root=data_root, num_classes=len(self._class_names())
      )
      if line_errors:
        raise DatasetValidationError(str(annotations_lib.AnnotationError(path, line_errors)))
      if not clips:
        raise DatasetValidationError(f"{path}: the {split} list holds no clips")
      out[split] = annotations_lib.rebase_absolute(clips, data_root)
    return out

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    data_root = self._data_root or manual_dir
    split_clips = self._split_annotations(manual_dir, data_root)
    reports = {}
    for split, clips in split_clips.items():
      reports[split] = validate.validate_clips(
        clips,
        class_names=self._class_names(),
        check_images=self._check_images,
        rgb_policy="convert",
      )
    if not all(r.ok for r in reports.values()):
      raise DatasetValidationError(
        f"{self.name}/{self.builder_config.name}: validation failed, nothing was written.\n"
        + "\n".join(f"{split} split:\n{r.format()}" for split, r in reports.items())
      )
    return {split: self._generate_examples(split, clips) for split, clips in split_clips.items()}

  def _generate_examples(
    self, split: str, clips: Sequence[annotations_lib.ClipAnnotation]
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    tasks = [
      (
        [str(p) for p in annotations_lib.list_frames(c.frame_dir)],
        cfg.resize_short_side,
        cfg.jpeg_quality,
      )
      for c in clips
    ]
    workers = self._num_workers or os.cpu_count() or 1
    workers = min(workers, len(tasks))

    def examples(encoded):
      # Inside download_and_prepare, data_path is tfds' temporary folder (renamed at the end).
      writer = packed.FramesWriter(self.data_path, split)
      try:
        for i, (clip, frames) in enumerate(zip(clips, encoded)):
          offset = writer.add(clip.clip_id, clip.label, frames)
          # validate_clips guarantees the folder holds exactly num_frames images.
          yield (
            i,
            {
              "label": clip.label,
              "clip_id": clip.clip_id,
              "num_frames": len(frames),
              "frame_offset": offset,
              "frame_sizes": [len(f) for f in frames],
            },
          )
      except BaseException:
        writer.abort()  # tfds deletes its temporary folder, blob included.
        raise
      writer.close()  # The clip table also gives readers every label without a record read.

    if workers <= 1:
      yield from examples(_encode_task(t) for t in tasks)
      return
    # spawn: the caller may have imported JAX (threads), where fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      yield from examples(pool.imap(_encode_task, tasks, chunksize=4))


def _fold_configs(dataset: str) -> list[ClipsConfig]:
  return [
    ClipsConfig(name=f"fold{k}", fold=k, description=f"{dataset} fold {k} of 5 (train / test).")
    for k in range(1, 6)
  ]


class Dfew(_ClipsBuilder):
  """DFEW: 11,697 single-label movie clips, 7 classes, 5 folds."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_LAYOUT
  BUILDER_CONFIGS = _fold_configs("DFEW")
  DATASET = datasets.get("dfew")
  HOMEPAGE = "https://dfew-dataset.github.io/"
  DESCRIPTION = "DFEW dynamic facial expressions (face-cropped frame folders)."

  def _split_annotations(self, manual_dir, data_root):
    if any(self.DATASET.find_list(manual_dir, s, self.builder_config.fold) for s in SPLITS):
      return super()._split_annotations(manual_dir, data_root)
    k = self.builder_config.fold
    split_dir = manual_dir / "EmoLabel_DataSplit"
    csvs = {s: split_dir / f"{s}(single-labeled)" / f"set_{k}.csv" for s in SPLITS}
    if not all(p.is_file() for p in csvs.values()):
      return super()._split_annotations(manual_dir, data_root)  # Raises: lists missing.
    return {s: _read_dfew_official(p, manual_dir, data_root) for s, p in csvs.items()}


class Ferv39k(_ClipsBuilder):
  """FERV39k: 38,935 clips, 7 classes, one train / test split."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_LAYOUT
  BUILDER_CONFIGS = [ClipsConfig(name="default", description="FERV39k train / test.")]
  DATASET = datasets.get("ferv39k")
  HOMEPAGE = "https://wangyanckxx.github.io/Proj_CVPR2022_FERV39k.html"
  DESCRIPTION = "FERV39k dynamic facial expressions (face-cropped frame folders)."


class Mafw(_ClipsBuilder):
  """MAFW: 9,172 single-label clips, 11 classes (reference order), 5 folds."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_LAYOUT
  BUILDER_CONFIGS = _fold_configs("MAFW")
  DATASET = datasets.get("mafw")
  HOMEPAGE = "https://mafw-database.github.io/MAFW/"
  DESCRIPTION = "MAFW dynamic facial expressions, 11 classes (face-cropped frame folders)."


class Synthetic(_ClipsBuilder):
  """The synthetic dynamic-expression dataset (dfer_clip_jax.data.synthetic)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Generate it: python -m dfer_clip_jax.data.synthetic "
    "--out=DIR --classes=7|11, then use DIR as manual_dir."
  )
  BUILDER_CONFIGS = [
    ClipsConfig(name="classes7", num_classes=7, description="7 classes (DFEW names)."),
    ClipsConfig(name="classes11", num_classes=11, description="11 classes (MAFW names)."),
  ]
  DESCRIPTION = "Synthetic face-like clips whose expression develops over time."

  def _class_names(self) -> tuple[str, ...]:
    name = "synthetic" if self.builder_config.num_classes == 7 else "synthetic11"
    return datasets.get(name).classes()

  DATASET = datasets.get("synthetic")  # its list naming (the class names come from the config)

  def _split_annotations(self, manual_dir, data_root):
    meta = synthetic.read_meta(manual_dir)
    if meta.get("num_classes") != self.builder_config.num_classes:
      raise DatasetValidationError(
        f"{manual_dir} holds a {meta.get('num_classes')}-class synthetic dataset, but the "
        f"config {self.builder_config.name} expects {self.builder_config.num_classes} "
        f"classes"
      )
    return super()._split_annotations(manual_dir, data_root)


BUILDERS: dict[str, type[_ClipsBuilder]] = {
  "dfew": Dfew,
  "ferv39k": Ferv39k,
  "mafw": Mafw,
  "synthetic": Synthetic,
}


def base_configs(dataset: str) -> list[str]:
  """Names of the predefined configs of `dataset`."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
  return [c.name for c in BUILDERS[dataset].BUILDER_CONFIGS]


def get_builder(
  dataset: str,
  config: str,
  *,
  data_dir: str | os.PathLike,
  resize_short_side: int = 0,
  jpeg_quality: int = DEFAULT_JPEG_QUALITY,
  data_root: str | os.PathLike | None = None,
  num_workers: int | None = None,
  check_images: bool = True,
) -> _ClipsBuilder:
  """A builder for `dataset` / `config` (a predefined config name) writing to `data_dir`."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
  cls = BUILDERS[dataset]
  cfg = make_config(cls, config, resize_short_side=resize_short_side, jpeg_quality=jpeg_quality)
  return cls(
    config=cfg,
    data_dir=os.fspath(data_dir),
    file_format="array_record",
    data_root=data_root,
    num_workers=num_workers,
    check_images=check_images,
  )


def build(
  dataset: str, config: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, **kwargs
) -> str:
  """Builds one config; returns the name to read it with (e.g. 'dfew/fold1_short224')."""
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    raise ManualDirError(f"manual_dir {manual_dir} does not exist or is not a folder")
  builder = get_builder(dataset, config, data_dir=data_dir, **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return f"{builder.name}/{builder.builder_config.name}"
