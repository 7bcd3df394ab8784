"""Tests of the packed datasets: tfds builders, packed_source, the build CLI, the benchmark."""

import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.data import (
  annotations,
  augment,
  build,
  datasets,
  packed,
  pipeline,
  sampling,
  synthetic,
  tfds_builders,
)

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(
    root,
    num_classes=7,
    num_clips=14,
    seed=5,
    image_size=32,
    min_frames=8,
    max_frames=20,
    processes=1,
  )
  return root


@pytest.fixture(scope="module")
def data_dir(synth, tmp_path_factory):
  """The synthetic set packed twice: as is (through the CLI) and resized (worker pool)."""
  out = tmp_path_factory.mktemp("tfds")
  assert (
    build.main(
      [
        "--dataset=synthetic",
        "--config=classes7",
        f"--manual_dir={synth}",
        f"--data_dir={out}",
        "--workers=1",
      ]
    )
    == 0
  )
  name = tfds_builders.build(
    "synthetic", "classes7", manual_dir=synth, data_dir=out, resize_short_side=24, num_workers=2
  )
  assert name == "synthetic/classes7_short24"
  return out


def _decode(data: bytes) -> Image.Image:
  im = Image.open(io.BytesIO(data))
  im.load()
  return im


@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_keeps_clips_labels_and_frames(synth, data_dir, split):
  clips = annotations.read_annotations(synth / f"{split}.txt", data_root=synth)
  source = packed.packed_source(data_dir, "synthetic/classes7", split)
  assert len(source) == len(clips)
  assert source.class_names == datasets.DFEW_CLASSES
  for i, clip in enumerate(clips):  # record i is line i of the list
    record = source[i]
    assert record["clip_id"] == clip.clip_id
    assert record["label"] == clip.label
    assert record["num_frames"] == clip.num_frames == len(record["frames"])
    files = annotations.list_frames(clip.frame_dir)
    # RGB JPEGs are stored as they are: byte-identical, decodable.
    assert list(record["frames"]) == [f.read_bytes() for f in files]
    assert record["frames"][-1] == files[-1].read_bytes()
  assert _decode(source[0]["frames"][0]).size == (32, 32)
  # tfds' records hold the same index (for tfds readers of the blob).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  records = tfds.data_source("synthetic/classes7", data_dir=data_dir, split=split)
  blob = packed.blob_path(source.folder, split).read_bytes()
  for i in (0, len(clips) - 1):
    rec = records[i]
    assert rec["clip_id"].decode() == clips[i].clip_id and rec["num_frames"] == len(
      rec["frame_sizes"]
    )
    start = int(rec["frame_offset"]) + int(sum(rec["frame_sizes"][:-1]))
    assert blob[start : start + int(rec["frame_sizes"][-1])] == source[i]["frames"][-1]
  assert source.labels == [c.label for c in clips]
  assert source[-1]["clip_id"] == clips[-1].clip_id
  with pytest.raises(IndexError, match="out of range"):
    source[len(clips)]


def test_resized_build_reencodes_frames(data_dir, synth):
  source = packed.packed_source(data_dir, "synthetic/classes7_short24", "train")
  plain = packed.packed_source(data_dir, "synthetic/classes7", "train")
  assert len(source) == len(plain)
  for i in (0, len(source) - 1):
    a, b = source[i], plain[i]
    assert (a["clip_id"], a["label"], a["num_frames"]) == (
      b["clip_id"],
      b["label"],
      b["num_frames"],
    )
    im = _decode(a["frames"][-1])
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (24, 24))


def test_packed_source_pickles_and_feeds_the_pipeline(data_dir):
  source = pickle.loads(pickle.dumps(packed.packed_source(data_dir, "synthetic/classes7", "test")))
  ds = pipeline.make_eval_dataset(source, batch_size=4, num_frames=8, image_size=16)
  batches = list(ds)
  videos = np.concatenate([b["video"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert videos.shape[1:] == (8, 16, 16, 3) and videos.dtype == np.uint8
  assert mask.sum() == len(source)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], source.labels)


def test_packed_source_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match="dataset name"):
    packed.packed_source(data_dir, "Synthetic/classes7", "train")
  with pytest.raises(FileNotFoundError, match="dfer_clip_jax.data.build"):
    packed.packed_source(tmp_path, "dfew/fold1", "train")


def _write_clip(folder: pathlib.Path, num_frames: int, mode: str = "RGB", ext: str = "jpg"):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(str(folder)))
  for t in range(num_frames):
    pixels = rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(folder / f"{t + 1:05d}.{ext}")


def test_reference_lists_with_grey_png_frames_become_rgb_jpegs(tmp_path):
  manual = tmp_path / "manual"
  _write_clip(manual / "clips" / "a", 3)
  _write_clip(manual / "clips" / "b", 2, mode="L", ext="png")
  _write_clip(manual / "clips" / "c", 4)
  (manual / "annotation").mkdir()
  (manual / "annotation" / "MAFW_set_2_train.txt").write_text("clips/a 3 10\nclips/b 2 7\n")
  (manual / "annotation" / "MAFW_set_2_test.txt").write_text("clips/c 4 0\n")
  name = tfds_builders.build(
    "mafw", "fold2", manual_dir=manual, data_dir=tmp_path / "tfds", num_workers=1
  )
  assert name == "mafw/fold2"
  train = packed.packed_source(tmp_path / "tfds", name, "train")
  assert train.class_names == datasets.MAFW_CLASSES
  assert [(r["clip_id"], r["label"], r["num_frames"]) for r in (train[0], train[1])] == [
    ("clips/a", 10, 3),
    ("clips/b", 7, 2),
  ]
  grey = _decode(train[1]["frames"][0])
  assert (grey.format, grey.mode, grey.size) == ("JPEG", "RGB", (28, 20))


def test_reference_lists_with_the_authors_absolute_paths(tmp_path):
  manual = tmp_path / "manual"
  for video in ("02522", "02536", "03060"):
    _write_clip(manual / "DFEW_Frame_Face" / video, 2)
  (manual / "annotation").mkdir()
  prefix = "/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face"
  (manual / "annotation" / "DFEW_set_1_train.txt").write_text(
    f"{prefix}/02522 2 5\n{prefix}/02536 2 6\n"
  )
  (manual / "annotation" / "DFEW_set_1_test.txt").write_text(f"{prefix}/03060 2 1\n")
  tfds_builders.build("dfew", "fold1", manual_dir=manual, data_dir=tmp_path / "tfds", num_workers=1)
  test = packed.packed_source(tmp_path / "tfds", "dfew/fold1", "test")
  assert (test[0]["clip_id"], test[0]["label"]) == ("DFEW_Frame_Face/03060", 1)
  assert list(test[0]["frames"]) == [
    p.read_bytes() for p in annotations.list_frames(manual / "DFEW_Frame_Face" / "03060")
  ]


def test_dfew_official_split_files(tmp_path):
  manual = tmp_path / "DFEW"
  split_dir = manual / "EmoLabel_DataSplit"
  for split, rows in (("train", [(1, 7), (12, 1)]), ("test", [(3, 5)])):
    (split_dir / f"{split}(single-labeled)").mkdir(parents=True)
    lines = ["video_name,label"] + [f"{v},{l}" for v, l in rows]
    (split_dir / f"{split}(single-labeled)" / "set_3.csv").write_text("\n".join(lines) + "\n")
    for video, _ in rows:
      _write_clip(manual / "Clip" / "clip_224x224" / f"{video:05d}", 2 + video % 3)
  tfds_builders.build("dfew", "fold3", manual_dir=manual, data_dir=tmp_path / "tfds", num_workers=1)
  train = packed.packed_source(tmp_path / "tfds", "dfew/fold3", "train")
  # DFEW's labels are 1-based in the same class order.
  assert [(r["clip_id"], r["label"], r["num_frames"]) for r in (train[0], train[1])] == [
    ("00001", 6, 3),
    ("00012", 0, 2),
  ]


def test_validation_errors_stop_the_build_with_the_full_report(synth, tmp_path):
  bad = tmp_path / "bad"
  for name in ("train.txt", "test.txt", "synthetic.json"):
    (bad / name).parent.mkdir(parents=True, exist_ok=True)
    (bad / name).write_bytes((synth / name).read_bytes())
  clips = annotations.read_annotations(bad / "test.txt", data_root=synth)
  for clip in clips:
    _write_clip(bad / clip.clip_id, clip.num_frames)
  first, second = clips[0].clip_id, clips[1].clip_id
  (bad / first / "00002.jpg").unlink()
  (bad / second / "00001.jpg").write_bytes(b"not a jpeg")
  (bad / "train.txt").write_text("")  # also an empty train list
  with pytest.raises(tfds_builders.DatasetValidationError) as info:
    tfds_builders.build(
      "synthetic", "classes7", manual_dir=bad, data_dir=tmp_path / "tfds", num_workers=1
    )
  message = str(info.value)
  assert "train.txt: the train list holds no clips" in message
  with pytest.raises(FileNotFoundError):
    packed.packed_source(tmp_path / "tfds", "synthetic/classes7", "test")
  (bad / "train.txt").write_bytes((synth / "train.txt").read_bytes())
  for clip in annotations.read_annotations(bad / "train.txt", data_root=synth):
    _write_clip(bad / clip.clip_id, clip.num_frames)
  with pytest.raises(tfds_builders.DatasetValidationError) as info:
    tfds_builders.build(
      "synthetic", "classes7", manual_dir=bad, data_dir=tmp_path / "tfds", num_workers=1
    )
  message = str(info.value)
  assert f"test.txt:1: error [too_few_frames] {first}" in message
  assert f"test.txt:2: error [unreadable_image] {second}" in message
  assert "nothing was written" in message


def test_missing_lists_and_class_count_mismatch(synth, tmp_path, capsys):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "readme.txt").write_text("x")
  with pytest.raises(tfds_builders.ManualDirError, match="FERV39K_train.txt"):
    tfds_builders.build(
      "ferv39k", "default", manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds"
    )
  # The CLI reports the problem and exits non-zero instead of a traceback.
  assert (
    build.main(
      [
        "--dataset=synthetic",
        "--config=classes11",
        f"--manual_dir={synth}",
        f"--data_dir={tmp_path / 'tfds'}",
      ]
    )
    == 1
  )
  assert "expects 11 classes" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    build.main(
      [
        "--dataset=dfew",
        "--config=fold9",
        f"--manual_dir={synth}",
        f"--data_dir={tmp_path / 'tfds'}",
      ]
    )


def test_a_sample_reads_only_its_frames(synth, data_dir, monkeypatch):
  """Bytes read (every os.pread counted) == the sampled frames' sizes, each read once."""
  clips = annotations.read_annotations(synth / "train.txt", data_root=synth)
  source = packed.packed_source(data_dir, "synthetic/classes7", "train")
  reads = []
  real_pread = os.pread

  def counting_pread(fd, n, offset):
    data = real_pread(fd, n, offset)
    reads.append(len(data))
    return data

  monkeypatch.setattr(os, "pread", counting_pread)
  i = max(range(len(clips)), key=lambda j: clips[j].num_frames)  # 16+ frames: 8 are a subset
  sizes = [f.stat().st_size for f in annotations.list_frames(clips[i].frame_dir)]
  record = source[i]
  assert reads == []  # opening a record reads no frame
  indices = sampling.train_indices(record["num_frames"], np.random.default_rng(3), 8)
  augment.decode_frames(record["frames"], indices)
  unique = sorted(set(int(k) for k in indices))
  assert len(unique) < len(sizes)
  assert sum(reads) == sum(sizes[k] for k in unique) and len(reads) == len(unique)
  # The fast path opens the first frame's header, then decodes: still one read per frame.
  reads.clear()
  record = source[i]
  test_idx = sampling.test_indices(record["num_frames"], 8)
  augment.load_test_clip(record["frames"], test_idx, size=16, fast_decode=True)
  assert sum(reads) == sum(sizes[k] for k in set(int(k) for k in test_idx))
  assert len(reads) == len(set(int(k) for k in test_idx))


def test_unpickled_source_reads_without_tfds_grain_or_jax(data_dir, tmp_path):
  """A worker process unpickles the source and decodes a frame with numpy, PIL, os.pread."""
  source = packed.packed_source(data_dir, "synthetic/classes7", "test")
  pickled = tmp_path / "source.pkl"
  pickled.write_bytes(pickle.dumps(source))
  assert pickled.stat().st_size < 2000  # names and paths, no tables
  code = (
    "import json, pickle, sys\n"
    f"source = pickle.loads(open({str(pickled)!r}, 'rb').read())\n"
    "from dfer_clip_jax.data import augment\n"
    "record = source[1]\n"
    "image = augment.decode_frames(record['frames'], [record['num_frames'] - 1])[0]\n"
    "heavy = [m for m in ('tensorflow_datasets', 'grain', 'jax') if m in sys.modules]\n"
    "print(json.dumps([record['clip_id'], image.size, heavy]))\n"
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
  ).stdout
  assert json.loads(out) == [source[1]["clip_id"], [32, 32], []]


def _copy_build(data_dir: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
  """A copy of synthetic/classes7 under data_dir `to`; returns its version folder."""
  shutil.copytree(data_dir / "synthetic" / "classes7", to / "synthetic" / "classes7")
  return to / "synthetic" / "classes7" / packed.LAYOUT_VERSION


def test_corrupt_or_truncated_blob_names_the_file_and_clip(data_dir, tmp_path):
  folder = _copy_build(data_dir, tmp_path)
  source = packed.packed_source(tmp_path, "synthetic/classes7", "train")
  blob = packed.blob_path(folder, "train")
  table = np.load(packed.frame_table_path(folder, "train"))
  clip_id = source[2]["clip_id"]
  row = source[2]["frames"]._first + 1  # frame 1 of clip 2
  offset = int(table[row]["offset"])
  data = bytearray(blob.read_bytes())
  data[offset + 40] ^= 0xFF
  blob.write_bytes(bytes(data))
  fresh = packed.packed_source(tmp_path, "synthetic/classes7", "train")
  assert fresh[2]["frames"][0]  # its neighbours read fine
  with pytest.raises(packed.PackedDataError) as info:
    fresh[2]["frames"][1]
  for part in ("corrupt", f"frame 1 of clip {clip_id}", str(blob), "dfer_clip_jax.data.build"):
    assert part in str(info.value)
  # Truncated under an open source (a sync still running): the read names the short file.
  os.truncate(blob, offset + 10)
  with pytest.raises(packed.PackedDataError, match=f"frame 1 of clip {clip_id}.*file ends"):
    source[2]["frames"][1]
  # Opening it checks the blob's size against the frame table and names the first cut clip.
  with pytest.raises(packed.PackedDataError, match=f"{blob} is {offset + 10} bytes.*{clip_id}"):
    packed.packed_source(tmp_path, "synthetic/classes7", "train")
  packed.clip_table_path(folder, "test").unlink()
  with pytest.raises(packed.PackedDataError, match="test.clip_table.npz is missing"):
    packed.packed_source(tmp_path, "synthetic/classes7", "test")


def _as_layout_1(version_folder: pathlib.Path) -> pathlib.Path:
  """Turns a copied build into what a 1.0.0 build looks like to a reader: tfds' files under
  1.0.0/ with that version, and no blob or tables (1.0.0 kept the frames in the records)."""
  old = version_folder.parent / "1.0.0"
  version_folder.rename(old)
  for f in old.glob("*.*_table.*"):
    f.unlink()
  for f in old.glob("*.frames"):
    f.unlink()
  info = json.loads((old / "dataset_info.json").read_text())
  info["version"] = "1.0.0"
  (old / "dataset_info.json").write_text(json.dumps(info))
  return old


def test_layout_1_builds_fail_with_the_rebuild_command(synth, data_dir, tmp_path):
  old = _as_layout_1(_copy_build(data_dir, tmp_path))
  with pytest.raises(packed.PackedDataError) as info:
    packed.packed_source(tmp_path, "synthetic/classes7", "train")
  command = (
    "python -m dfer_clip_jax.data.build --dataset=synthetic --config=classes7 "
    f"--manual_dir=MANUAL_DIR --data_dir={tmp_path}"
  )
  message = str(info.value)
  assert str(old) in message and command in message and "of layout 1.0.0" in message
  assert packed.rebuild_command("/d", "dfew/fold3_short224_q90") == (
    "python -m dfer_clip_jax.data.build --dataset=dfew --config=fold3 "
    "--resize_short_side=224 --jpeg_quality=90 --manual_dir=MANUAL_DIR --data_dir=/d"
  )
  # The command, run, writes 2.0.0 next to it, which is then read.
  args = command.replace("MANUAL_DIR", str(synth)).split()[3:]
  assert build.main([*args, "--workers=1", "--no_check_images"]) == 0
  source = packed.packed_source(tmp_path, "synthetic/classes7", "train")
  assert source.folder == str(old.parent / packed.LAYOUT_VERSION) and source[0]["frames"][0]


def test_a_failed_build_leaves_nothing_that_opens(synth, tmp_path, monkeypatch):
  calls = []

  def encode_then_fail(task):
    calls.append(task)
    if len(calls) == 3:
      raise RuntimeError("killed")
    return tfds_builders.encode_frames(*task)

  monkeypatch.setattr(tfds_builders, "_encode_task", encode_then_fail)
  with pytest.raises(RuntimeError, match="killed"):
    tfds_builders.build("synthetic", "classes7", manual_dir=synth, data_dir=tmp_path, num_workers=1)
  assert not list(tmp_path.glob("**/*.frames")) and not list(tmp_path.glob("**/*_table.*"))
  with pytest.raises(FileNotFoundError, match="not found"):
    packed.packed_source(tmp_path, "synthetic/classes7", "train")
