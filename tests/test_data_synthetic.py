"""Tests of the synthetic dynamic-expression dataset (dfer_clip_jax/data/synthetic.py)."""

import collections
import hashlib
import itertools
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.data import annotations, synthetic

NUM_CLIPS = 23  # 7 classes: counts 4, 3, 3, ... exercise the +-1 balance


def _digest(root: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  """The same tiny dataset twice: in-process and with a 2-process pool."""
  out = []
  for processes in (1, 2):
    root = tmp_path_factory.mktemp(f"synthetic_p{processes}")
    paths = synthetic.generate(
      root, num_classes=7, num_clips=NUM_CLIPS, seed=3, folds=3, image_size=32, processes=processes
    )
    out.append((root, paths))
  return out


def test_same_seed_gives_identical_bytes_with_and_without_pool(generated):
  (root_a, _), (root_b, _) = generated
  digest_a, digest_b = _digest(root_a), _digest(root_b)
  assert len(digest_a) > NUM_CLIPS * 8
  assert digest_a == digest_b


def test_other_seed_gives_other_frames(tmp_path, generated):
  root, _ = generated[0]
  synthetic.generate(tmp_path, num_classes=7, num_clips=14, seed=4, image_size=32, processes=1)
  frame = "frames/c00000/00001.jpg"
  assert (tmp_path / frame).read_bytes() != (root / frame).read_bytes()


def test_lists_are_readable_and_match_the_folders(generated):
  root, paths = generated[0]
  assert set(paths) == {"train", "test", "meta"} | {
    f"{s}_fold{k}" for s in ("train", "test") for k in (1, 2, 3)
  }
  seen = {}
  for name in ("train", "test"):
    for clip in annotations.read_annotations(paths[name], data_root=root, num_classes=7):
      assert 8 <= clip.num_frames <= 120
      frames = annotations.list_frames(clip.frame_dir)
      assert [f.name for f in frames] == [f"{t:05d}.jpg" for t in range(1, clip.num_frames + 1)]
      assert clip.clip_id.startswith("frames/c")  # relative to the output folder
      seen[clip.clip_id] = clip.label
  assert len(seen) == NUM_CLIPS  # train and test partition all clips
  counts = collections.Counter(seen.values())
  assert set(counts) == set(range(7)) and max(counts.values()) - min(counts.values()) <= 1
  assert json.loads(paths["meta"].read_text())["num_classes"] == 7
  with Image.open(root / "frames" / "c00000" / "00001.jpg") as im:
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))


def test_split_and_folds_are_stratified_partitions(generated):
  root, paths = generated[0]

  def read(name):
    return {c.clip_id: c.label for c in annotations.read_annotations(paths[name], data_root=root)}

  train, test = read("train"), read("test")
  assert not set(train) & set(test)
  for label in range(7):
    assert (
      1
      <= sum(v == label for v in test.values())
      < sum(v == label for v in {**train, **test}.values())
    )
  test_folds = [read(f"test_fold{k}") for k in (1, 2, 3)]
  all_clips = {**train, **test}
  assert sorted(itertools.chain.from_iterable(test_folds)) == sorted(all_clips)
  for k, fold in enumerate(test_folds, start=1):
    assert set(read(f"train_fold{k}")) == set(all_clips) - set(fold)
    assert set(fold.values()) == set(range(7))  # every class in every test fold


def test_render_clip_shape_and_errors():
  clip = synthetic.render_clip(0, 9, np.random.default_rng(0), size=40)
  assert clip.shape == (9, 40, 40, 3) and clip.dtype == np.uint8
  with pytest.raises(ValueError, match="label 11"):
    synthetic.render_clip(11, 9, np.random.default_rng(0), size=40)
  with pytest.raises(ValueError, match="num_frames"):
    synthetic.render_clip(0, 0, np.random.default_rng(0), size=40)


@pytest.fixture(scope="module")
def same_identity_clips():
  """All 11 classes rendered from equally seeded generators: only the expression differs."""
  out = []
  for seed in range(2):
    out.append(
      {
        label: synthetic.render_clip(label, 24, np.random.default_rng([seed, 7]), 48).astype(
          np.float32
        )
        for label in range(11)
      }
    )
  return out


def test_expression_cues_differ_between_every_pair_of_classes(same_identity_clips):
  for clips in same_identity_clips:
    for a, b in itertools.combinations(range(11), 2):
      per_frame = np.abs(clips[a] - clips[b]).mean(axis=(1, 2, 3))  # (T,)
      # Same identity, scene, motion and noise: a difference is the expression's. The face
      # covers most of the frame; a cue changes a few percent of it by tens of levels.
      assert per_frame.max() > 0.5, (a, b, per_frame.max())
    again = synthetic.render_clip(3, 24, np.random.default_rng([0, 7]), 48)
    np.testing.assert_array_equal(again, same_identity_clips[0][3].astype(np.uint8))


def test_expressions_start_from_the_resting_face(same_identity_clips):
  # Onset -> apex: every class but neutral (which may talk) and disappointment (which
  # starts smiling) begins at the identity's resting face, identical across classes.
  for clips in same_identity_clips:
    developing = [0, 1, 3, 4, 5, 6, 7, 8, 9]
    for label in developing[1:]:
      np.testing.assert_array_equal(clips[label][0], clips[developing[0]][0])
    assert np.abs(clips[10][0] - clips[0][0]).mean() > 0.5


def test_surprise_and_fear_share_the_apex_and_differ_in_dynamics(same_identity_clips):
  assert synthetic.apex_values(4) == synthetic.apex_values(6)
  for clips in same_identity_clips:

    def motion(video):  # mean frame-to-frame change over the last third (after onset)
      return np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))[-8:].mean()

    # Sensor noise and head drift are shared by all labels: neutral gives their level.
    floor = motion(clips[2])
    # Surprise holds its apex; fear keeps moving (oscillation + tremble).
    assert motion(clips[6]) - floor > 3 * max(motion(clips[4]) - floor, 0.5)


def test_cli_writes_lists_and_refuses_to_overwrite(tmp_path, capsys):
  args = [
    "--out",
    str(tmp_path),
    "--classes",
    "11",
    "--clips",
    "22",
    "--size",
    "24",
    "--seed",
    "1",
    "--max_frames",
    "12",
    "--processes",
    "1",
  ]
  assert synthetic.main(args) == 0
  assert "wrote 22 clips" in capsys.readouterr().out
  clips = annotations.read_annotations(tmp_path / "train.txt", data_root=tmp_path, num_classes=11)
  assert all(8 <= c.num_frames <= 12 for c in clips)
  with pytest.raises(FileExistsError, match="overwrite"):
    synthetic.main(args)
  assert synthetic.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"num_classes": 5}, "num_classes"),
    ({"num_clips": 10}, "num_clips"),
    ({"folds": 1}, "folds"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"min_frames": 9, "max_frames": 8}, "min_frames"),
  ],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, match):
  args = dict(num_classes=7, num_clips=14, processes=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    synthetic.generate(tmp_path, **args)
