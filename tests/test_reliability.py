"""What the README promises of a training run, on data a tiny model learns in seconds.

Colour clips: each class is a solid colour with pixel noise, so a tiny random CLIP with the
DFER-CLIP head must end well above chance after a few epochs (a run that stops learning fails).
The runs go through the folds runner with the paper protocol on frame folders named by `{fold}`
under `data.root`, with one unreadable clip in each fold's train list.
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax import folds, preemption, train
from dfer_clip_jax.data import datasets, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import dfew  # noqa: E402  pylint: disable=g-import-not-at-top
from dfer_clip_jax import config_lib  # noqa: E402

# RGB of the 7 classes (DFEW's label order; only the colours matter).
COLOURS = np.array(
  [
    [230, 40, 40],
    [40, 200, 40],
    [40, 60, 230],
    [230, 220, 40],
    [200, 40, 220],
    [40, 220, 220],
    [240, 240, 240],
  ]
)
TRAIN_PER_CLASS, TEST_PER_CLASS, FRAMES = 8, 2, 6
EPOCHS, BATCH = 4, 8
STEPS_PER_EPOCH = 7 * TRAIN_PER_CLASS // BATCH  # the bad clip left out, no validation carve
BAD_LINE = 7 * TRAIN_PER_CLASS + 1  # the unreadable clip is the train lists' last line


def _write_clip(folder: pathlib.Path, colour, rng) -> None:
  folder.mkdir(parents=True)
  for t in range(FRAMES):
    pixels = np.clip(colour + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"{t:03d}.jpg")


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory):
  """<root>/lists/fold{k}_{train,test}.txt (k = 1, 2) naming folders under <root>/frames."""
  root = tmp_path_factory.mktemp("colours")
  (root / "lists").mkdir()
  rng = np.random.default_rng(0)
  for fold in (1, 2):
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
      lines = []
      for label, colour in enumerate(COLOURS):
        for i in range(per_class):
          name = f"frames/f{fold}_{split}_{label}_{i}"
          _write_clip(root / name, colour, rng)
          lines.append(f"{name} {FRAMES} {label}")
      if split == "train":
        bad = root / f"frames/f{fold}_broken"
        bad.mkdir()
        for t in range(FRAMES):
          (bad / f"{t:03d}.jpg").write_bytes(b"not a jpeg")
        lines.append(f"frames/f{fold}_broken {FRAMES} 0")
      (root / "lists" / f"fold{fold}_{split}.txt").write_text("\n".join(lines) + "\n")
  return root


def colour_config(root, **extra):
  """The DFEW recipe with protocol=paper, on a tiny CLIP (the tiny runs' shapes of
  test_train) and AdamW (a random CLIP does not learn at the paper's image-tower lr)."""
  c = dfew.get_config("variant=tiny,protocol=paper")
  overrides = {
    "clip.image_size": 16,
    "model.num_frames": 4,
    "model.temporal_heads": 4,
    "model.temporal_dim_head": 16,
    "model.temporal_mlp_dim": 128,
    "model.normalize": True,
    "data.source": "folders",
    "data.root": str(root),
    "data.train_list": "lists/fold{fold}_train.txt",
    "data.test_list": "lists/fold{fold}_test.txt",
    "data.bad_clip_policy": "skip",
    "data.worker_count": 0,
    "optim.name": "adamw",
    "optim.weight_decay": 0.0,
    "train.epochs": EPOCHS,
    "train.batch_size": BATCH,
    "train.eval_batch_size": BATCH,
    "train.log_every_steps": 1,
    # One device: compiles and saves faster (sharding over 8 is tested in test_train).
    "mesh.data": 1,
    **extra,
  }
  with c.unlocked():
    config_lib.apply_preset(c, overrides)
    c.optim.lr = dict(temporal=3e-3, image=3e-3, prompt=3e-3, head=3e-3)
  return c


def test_bad_clip_policy_error_stops_before_any_step(colour_root, tmp_path):
  """The default policy: the run stops while reading the data, with the report naming the
  list resolved under data.root with the fold's number, the line and what is wrong."""
  workdir = tmp_path / "run"
  c = colour_config(colour_root, **{"data.bad_clip_policy": "error"})
  expected = f"{colour_root / 'lists' / 'fold2_train.txt'}:{BAD_LINE}: error [unreadable_image]"
  with pytest.raises(validate.ValidationError, match="bad_clip_policy=skip") as info:
    with c.unlocked():
      c.fold = 2
    train.train_and_evaluate(c, workdir)
  assert expected in str(info.value) and "f2_broken" in str(info.value)
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_two_folds_learn_skip_the_bad_clip_and_resume_an_interrupted_fold(
  colour_root, tmp_path, monkeypatch, capsys
):
  """Fold 1 trains to the end; fold 2 is preempted after step 3 (the folds runner stops);
  the rerun keeps fold 1, resumes fold 2 at step 3 and writes the mean ± std table. Fold 1's
  unreadable clip is left out by the start-up validation, fold 2's (data.validate=False) while
  training: both are listed in the fold's skipped_clips.txt with why."""
  config = colour_config(colour_root)
  real_run = train.train_and_evaluate
  calls = []

  def interrupt_fold2_once(c, workdir):
    calls.append(c.fold)
    if c.fold == 2:  # its unreadable clip is found while training, not by the validation
      with c.unlocked():
        c.data.validate = False
    if c.fold == 2 and calls.count(2) == 1:
      monkeypatch.setenv(preemption.ENV_TEST_SIGNAL, "0:3")
    else:
      monkeypatch.delenv(preemption.ENV_TEST_SIGNAL, raising=False)
    return real_run(c, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", interrupt_fold2_once)
  with pytest.raises(preemption.Preempted, match="checkpoint of step 3 saved"):
    folds.run_folds(config, tmp_path, folds=[1, 2])
  fold2 = tmp_path / "fold2"
  assert (tmp_path / "fold1" / "report.json").is_file() and not (fold2 / "report.json").exists()
  assert sorted(p.name for p in (fold2 / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
  capsys.readouterr()

  summary = folds.run_folds(config, tmp_path, folds=[1, 2])
  out = capsys.readouterr().out
  assert calls == [1, 2, 2]  # fold 1 was not trained again
  assert "fold 1: finished earlier" in out and "Resumed from checkpoint step 3" in out

  for fold in (1, 2):
    run = tmp_path / f"fold{fold}"
    report = json.loads((run / "report.json").read_text())
    # protocol=paper: no validation split, every kept train clip trains, selection on test.
    assert all(entry["val"] is None for entry in report["history"])
    assert report["rows"]["best by validation"] is None
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) == EPOCHS * STEPS_PER_EPOCH
    # Learning: chance is 14.3 %; the colours are separable.
    assert report["rows"]["last epoch"]["war"] >= 70.0, report["rows"]
    # The fold's own lists, and the unreadable clip left out with why.
    predictions = (run / "eval" / "last" / "predictions.csv").read_text()
    assert f"f{fold}_test_" in predictions and f"f{3 - fold}_test_" not in predictions
    skipped = (run / "skipped_clips.txt").read_text().splitlines()
    assert len(skipped) == 1, skipped
    assert skipped[0].startswith(f"{colour_root / 'lists' / f'fold{fold}_train.txt'}:{BAD_LINE} ")
    broken = colour_root / "frames" / f"f{fold}_broken"
    if fold == 1:
      assert f" {broken}: [unreadable_image] " in skipped[0] and "cannot be decoded" in skipped[0]
    else:
      assert " frames/f2_broken: " in skipped[0] and "cannot identify image file" in skipped[0]
      assert "(first skipped at training step" in skipped[0]

  last = summary["last epoch"]
  assert last["num_folds"] == 2
  wars = [json.loads((tmp_path / f"fold{k}/report.json").read_text()) for k in (1, 2)]
  wars = [r["rows"]["last epoch"]["war"] for r in wars]
  assert last["war"]["mean"] == pytest.approx(np.mean(wars))
  assert last["war"]["std"] == pytest.approx(np.std(wars, ddof=1))
  table = (tmp_path / "folds.md").read_text()
  assert "2 folds" in table and "±" in table


def test_training_from_packed_data_named_by_fold(colour_root, tmp_path):
  """Fold 2's lists (the unreadable clip left out) packed at short side 20 as
  dfew/fold2_short20; data.packed_name='dfew/fold{fold}_short20' trains and evaluates on it (the
  default name, dfew/fold2, does not exist)."""
  from dfer_clip_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  manual = tmp_path / "manual"
  (manual / "annotation").mkdir(parents=True)
  (manual / "frames").symlink_to(colour_root / "frames")
  for split in ("train", "test"):
    lines = (colour_root / "lists" / f"fold2_{split}.txt").read_text().splitlines()
    lines = [x for x in lines if "broken" not in x]
    # Under the dataset's own list name (the registry's), where the builder looks.
    list_file = datasets.get("dfew").list_file(split, 2)
    (manual / "annotation" / list_file).write_text("\n".join(lines) + "\n")
  data_dir = tmp_path / "tfds"
  name = tfds_builders.build(
    "dfew", "fold2", manual_dir=manual, data_dir=data_dir, resize_short_side=20, num_workers=1
  )
  assert name == "dfew/fold2_short20"
  c = colour_config(
    colour_root,
    **{
      "fold": 2,
      "data.source": "packed",
      "data.packed_dir": str(data_dir),
      "data.packed_name": "dfew/fold{fold}_short20",
      "train.epochs": 1,
    },
  )
  report = train.train_and_evaluate(c, tmp_path / "run")
  assert len(report["history"]) == 1 and report["last_test"]["counts"]["total"] == 7 * 2
  steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps == [STEPS_PER_EPOCH]
  predictions = (tmp_path / "run" / "eval" / "last" / "predictions.csv").read_text()
  assert "f2_test_" in predictions and "f1_test_" not in predictions
