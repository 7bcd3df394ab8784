"""One "best": the report, the checkpoint kept as best, `--checkpoint=best` and predict's
`--which=best` select the same step (`metrics.selection_key`), ties going to the earlier epoch."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfer_clip_jax import checkpointing, config_lib, evaluate, restore, train
from dfer_clip_jax import metrics as metrics_lib
from tests.test_train import synth, tiny_config  # noqa: F401  (the module's tiny run shapes)


def _entry(epoch, step, val_uar, test_war, val_war=50.0):
  return {
    "epoch": epoch,
    "step": step,
    "test": {"uar": 10.0 * epoch, "war": test_war},
    "val": {"uar": val_uar, "war": val_war},
  }


def test_ties_go_to_the_earlier_epoch_in_the_report_and_the_kept_checkpoint(tmp_path):
  # Epochs 1 and 3 tie on validation UAR (epoch 3 even has the higher validation WAR); epochs 2
  # and 3 tie on test WAR.
  history = [_entry(1, 10, 40.0, 20.0), _entry(2, 20, 30.0, 30.0), _entry(3, 30, 40.0, 30.0, 90)]
  rows = metrics_lib.report_rows(history)
  assert (
    rows[metrics_lib.ROW_BEST_VAL]["epoch"] == 1 and rows[metrics_lib.ROW_BEST_VAL]["step"] == 10
  )
  assert rows[metrics_lib.ROW_PAPER]["step"] == 20
  no_val = [{**h, "val": None} for h in history]
  assert metrics_lib.report_rows(no_val)[metrics_lib.ROW_BEST_VAL] is None

  # Retention (keep only the newest plus the best) keeps the report's step, and the best step
  # answered afterwards is that step.
  device = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  ck = checkpointing.Checkpointer(tmp_path, keep_last=1, best_metric=restore.BEST_METRIC)
  for h in history:
    state = {"w": jax.device_put(np.full((3,), h["step"], np.float32), device)}
    key = list(metrics_lib.selection_key(h))
    ck.save(h["step"], state=state, data_state={}, config={}, metrics={"select": key}, force=True)
  assert ck.all_steps() == [10, 30]
  assert ck.best_step() == 10
  ck.close()


@pytest.fixture
def tied_run(synth, tmp_path, monkeypatch):  # noqa: F811
  """A tiny two-epoch run whose epochs score the same: each epoch's evaluation is replaced by
  the same numbers (a real tie, cheaply; the final report still evaluates the model)."""

  def tied_eval(self, epoch, step, writer):
    return {"epoch": epoch, "step": step, "test": {"uar": 30.0, "war": 30.0}, "val": TIED}

  monkeypatch.setattr(train.Trainer, "_epoch_eval", tied_eval)
  config = tiny_config(synth, **{"train.keep_checkpoints": 1})
  return config, tmp_path, train.train_and_evaluate(config, tmp_path)


TIED = {"uar": 14.29, "war": 14.29}


def test_a_tied_run_has_one_best_everywhere(tied_run, capsys):
  config, workdir, report = tied_run
  h1, h2 = report["history"]
  assert h1["val"] == h2["val"] == TIED  # the tie this test is about
  best = report["rows"][metrics_lib.ROW_BEST_VAL]
  assert best["epoch"] == 1 and best["step"] == h1["step"]
  # Retention kept the best step although a newer one ties with it.
  assert (workdir / "checkpoints" / str(best["step"])).is_dir()
  # --mode=eval --checkpoint=best: the same step, and it says which epoch it is.
  result = evaluate.evaluate_checkpoint(config, workdir, "best")
  assert result["step"] == best["step"]
  assert "epoch 1, the best by the selection rule" in capsys.readouterr().out
  # predict --which=best reads the model through the same restore.
  assert restore.resolve_checkpoint(workdir, "best").step == best["step"]
  # The folds table reads the report's rows: nothing else to select there.


def test_the_readme_list_names_are_found_by_training_and_the_builder(synth, tmp_path):  # noqa: F811
  """A DFEW-layout folder with the authors' list names (the README's layout): training reads
  it with no list flags, and the builder finds the same lists."""
  from dfer_clip_jax.data import sources, tfds_builders

  (tmp_path / "annotation").mkdir()
  for split in ("train", "test"):
    lines = (synth / f"{split}.txt").read_text()
    (tmp_path / "annotation" / f"DFEW_set_1_{split}.txt").write_text(lines)
  (tmp_path / "frames").symlink_to(synth / "frames")
  config = tiny_config(synth, **{"data.source": "folders", "data.val_fraction": 0.0})
  with config.unlocked():
    config.dataset = "dfew"
    config.data.root = str(tmp_path)
    config.data.augment = "none"
  built = sources.build_sources(config_lib.resolve_paths(config), tmp_path / "work")
  assert len(built.train) + len(built.test) == 42
  builder = tfds_builders.Dfew(config="fold1", data_dir=str(tmp_path / "tfds"))
  found = builder._split_annotations(tmp_path, tmp_path)  # pylint: disable=protected-access
  assert [len(found[s]) for s in ("train", "test")] == [len(built.train), len(built.test)]
