"""Tests of the packed datasets: tfds builders, packed_source, the build CLI, the benchmark."""

import io
import json
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.benchmarks import input_pipeline
from dfer_clip_jax.data import (
  annotations,
  build,
  datasets,
  packed,
  pipeline,
  synthetic,
  tfds_builders,
)


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
    assert record["frames"] == [f.read_bytes() for f in files]
  assert _decode(source[0]["frames"][0]).size == (32, 32)
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
  assert test[0]["frames"] == [
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


def test_benchmark_tiny_run_writes_the_json_schema(tmp_path):
  out = tmp_path / "bench.json"
  assert (
    input_pipeline.main(
      [
        f"--json={out}",
        "--clips=14",
        "--workers=0",
        "--image_size=16",
        "--render_size=24",
        "--batch_size=2",
        "--seconds=0",
        "--min_batches=1",
      ]
    )
    == 0
  )
  result = json.loads(out.read_text())
  for key in (
    "train_packed_clips_per_s",
    "train_folders_clips_per_s",
    "eval_packed_clips_per_s",
    "eval_folders_clips_per_s",
    "baseline_clips_per_s",
    "train_packed_1thread_clips_per_s",
    "train_packed_fast_decode_clips_per_s",
  ):
    assert result[key] > 0, key
  assert result["workers"] == [0] and result["cores"] >= 1
  # The headline names its configuration; the default path's figures stay alongside.
  config = result["train_packed_config"]
  assert result["train_packed_clips_per_s"] == config["clips_per_s"] > 0
  assert (
    config["name"] == "default"
    or config["name"].removeprefix("train_packed_") in (result["extras"])
  )
  assert result["train_packed_default_clips_per_s"] > 0
  assert (
    result["train_packed_vs_baseline_per_cpu_s"]
    >= (result["train_packed_default_vs_baseline_per_cpu_s"])
  )
  assert "short16_workers0_threads2_fast_decode" in result["extras"]
  assert set(result["per_workers"]["0"]) == {
    "train_packed",
    "train_folders",
    "eval_packed",
    "eval_folders",
  }
  assert (result["image_size"], result["render_size"], result["num_frames"]) == (16, 24, 16)
  assert result["machine"]["cpu_count"] >= 1


def test_baseline_batches_are_reference_shaped(synth):
  clips = annotations.read_annotations(synth / "train.txt", data_root=synth)
  batch = next(input_pipeline.baseline_clips(clips, 16, batch_size=3))
  assert batch.shape == (3, 16, 3, 16, 16) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0
