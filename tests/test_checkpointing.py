"""Orbax checkpoints: round trip across device counts, last K + best, broken-latest fallback."""

import logging
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfer_clip_jax import checkpointing

CONFIG = {"model": {"variant": "B/32", "ctx": 8}, "lr": 0.01, "milestones": [30, 40]}


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8, "tests/conftest.py configures 8 fake CPU devices"
  return Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))


@pytest.fixture(scope="module")
def mesh1():
  return Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))


def _specs():
  return {"params": {"w": P("data", None), "b": P()}, "opt": {"mu": P("data", None)}, "step": P()}


def make_state(step: int, mesh: Mesh):
  """A small train-state-like pytree whose values depend on `step`."""
  w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) + 100 * step
  tree = {
    "params": {"w": w, "b": np.full((5,), step, np.float32)},
    "opt": {"mu": -w},
    "step": np.int32(step),
  }
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, _specs())


def abstract_state(mesh: Mesh):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
    make_state(0, mesh),
    _specs(),
  )


def assert_state(state, step: int, mesh: Mesh):
  expected = make_state(step, mesh)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def save_steps(ck, steps, mesh, metrics=None):
  for s in steps:
    m = None if metrics is None else metrics.get(s)
    assert ck.save(
      s, state=make_state(s, mesh), data_state={"position": s}, config=CONFIG, metrics=m, force=True
    )
  ck.wait()


def test_round_trip_retention_and_device_counts(tmp_path, mesh8, mesh1, caplog):
  directory = tmp_path / "work" / "checkpoints"
  ck = checkpointing.Checkpointer(directory, keep_last=2, keep_best=True, best_metric="uar")
  metrics = {
    1: {"uar": 10.0, "war": 20.0},
    2: {"uar": 90.0, "war": 10.0},
    4: {"uar": 20.0, "war": 30.0},
    5: {"uar": 30.0, "war": 40.0},
  }  # 3: mid-epoch
  with caplog.at_level(logging.WARNING):
    save_steps(ck, [1, 2, 3, 4, 5], mesh8, metrics)
  assert "did not provide metrics" not in caplog.text  # mid-epoch saves are not an anomaly
  # The last two plus the best (2), although older than the last two; 1 and 3 are gone.
  assert ck.all_steps() == [2, 4, 5]
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["2", "4", "5"]
  assert ck.best_step() == 2
  assert ck.latest_valid_step() == 5

  # Saved on 8 devices, restored on 1.
  step, state, data_state, config, m = ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert (step, data_state, config, m) == (5, {"position": 5}, CONFIG, {**metrics[5], "step": 5})
  assert_state(state, 5, mesh1)
  step, state, _, _, m = ck.restore("best", abstract_state=abstract_state(mesh1))
  assert (step, m) == (2, {**metrics[2], "step": 2})
  assert_state(state, 2, mesh1)
  for which in (4, "4"):
    step, state, *_ = ck.restore(which, abstract_state=abstract_state(mesh8))
    assert step == 4
    assert_state(state, 4, mesh8)
  with pytest.raises(FileNotFoundError, match="no checkpoint step 3 .* steps there: \\[2, 4, 5\\]"):
    ck.restore(3, abstract_state=abstract_state(mesh1))
  ck.close()

  # A step folder copied elsewhere restores by path, and its config reads without arrays.
  copied = tmp_path / "exported_step"
  shutil.copytree(directory / "4", copied)
  reopened = checkpointing.Checkpointer(directory, keep_last=2)
  step, state, data_state, _, m = reopened.restore(copied, abstract_state=abstract_state(mesh1))
  assert (step, data_state, m) == (4, {"position": 4}, {**metrics[4], "step": 4})
  assert_state(state, 4, mesh1)
  reopened.close()
  assert checkpointing.read_config(copied) == CONFIG
  assert checkpointing.read_config(tmp_path / "work") == CONFIG
  assert checkpointing.read_config(directory) == CONFIG


def test_standalone_folder_from_one_device_restores_on_eight(tmp_path, mesh8, mesh1):
  path = tmp_path / "converted"
  checkpointing.save_checkpoint_dir(path, state=make_state(7, mesh1), config=CONFIG, step=7)
  assert checkpointing.verify_checkpoint(path) is None
  ck = checkpointing.Checkpointer(tmp_path / "ckpts", keep_last=1)
  step, state, data_state, config, metrics = ck.restore(
    str(path), abstract_state=abstract_state(mesh8)
  )
  assert (step, data_state, config, metrics) == (7, None, CONFIG, None)
  assert_state(state, 7, mesh8)
  with pytest.raises(FileNotFoundError, match="no checkpoints in"):
    ck.restore("latest", abstract_state=abstract_state(mesh8))
  with pytest.raises(FileNotFoundError, match="there is no best step"):
    ck.restore("best", abstract_state=abstract_state(mesh8))
  ck.close()


def _truncate_data_file(step_dir: pathlib.Path):
  data = max(
    (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
    key=lambda p: p.stat().st_size,
  )
  with open(data, "r+b") as fh:
    fh.truncate(data.stat().st_size // 2)


def _delete_data_file(step_dir: pathlib.Path):
  next(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d").unlink()


def _remove_commit_marker(step_dir: pathlib.Path):
  (step_dir / checkpointing.COMMIT_FILE).unlink()


def _empty_data_files_without_record(step_dir: pathlib.Path):
  # Without the integrity record only Orbax's metadata read (which opens the data files) sees it.
  (step_dir / checkpointing.INTEGRITY_FILE).unlink()
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(b"")


# Orbax's failed reads of the damaged files leave an "Event loop is closed" error in a background
# thread; it is Orbax's, harmless, and not what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "corrupt,reason",
  [
    (_truncate_data_file, "bytes but .* were written"),
    (_delete_data_file, "is missing"),
    (_remove_commit_marker, "no commit_success.txt commit marker"),
    (_empty_data_files_without_record, "the metadata of state/ is unreadable"),
  ],
)
def test_broken_latest_falls_back(tmp_path, mesh1, caplog, corrupt, reason):
  directory = tmp_path / "checkpoints"
  ck = checkpointing.Checkpointer(directory, keep_last=5)
  save_steps(ck, [1, 2, 3], mesh1)
  ck.close()
  corrupt(directory / "3")

  # A new run in the same directory (as after a crash).
  ck = checkpointing.Checkpointer(directory, keep_last=5)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert ck.latest_valid_step() == 2
  messages = [r.getMessage() for r in caplog.records]
  assert any(str(directory / "3") in m and re.search(reason, m) for m in messages), messages

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    step, state, data_state, _, _ = ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert (step, data_state) == (2, {"position": 2})
  assert_state(state, 2, mesh1)
  messages = [r.getMessage() for r in caplog.records]
  assert any(str(directory / "3") in m and "unusable" in m for m in messages), messages
  # The broken step is set aside, so the resumed run can save step 3 again.
  assert (directory / "3.corrupt").is_dir() and not (directory / "3").exists()
  assert ck.all_steps() == [1, 2]
  save_steps(ck, [3], mesh1)
  step, state, *_ = ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert step == 3
  assert_state(state, 3, mesh1)
  ck.close()


def test_latest_that_fails_to_read_falls_back(tmp_path, mesh1, caplog, monkeypatch):
  """Damage that only reading the arrays reveals: restore('latest') still falls back."""
  ck = checkpointing.Checkpointer(tmp_path, keep_last=5)
  save_steps(ck, [1, 2], mesh1)
  real_restore = checkpointing._restore_dir

  def failing_restore(path, abstract):
    if path.name == "2":
      raise ValueError("DATA_LOSS: simulated unreadable chunk")
    return real_restore(path, abstract)

  monkeypatch.setattr(checkpointing, "_restore_dir", failing_restore)
  with caplog.at_level(logging.WARNING):
    step, state, *_ = ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert step == 1
  assert_state(state, 1, mesh1)
  assert any("reading it failed (ValueError: DATA_LOSS" in r.getMessage() for r in caplog.records)
  assert ck.all_steps() == [1] and (tmp_path / "2.corrupt").is_dir()

  # A failure that is no evidence of damage (a wrong abstract_state, permissions) stops with
  # its cause, and nothing is skipped or renamed.
  monkeypatch.setattr(
    checkpointing,
    "_restore_dir",
    lambda path, abstract: (_ for _ in ()).throw(ValueError("mismatch")),
  )
  with pytest.raises(
    checkpointing.CheckpointAccessError,
    match=r"checkpoints?.*1: reading it failed with ValueError: mismatch",
  ):
    ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert ck.all_steps() == [1] and not (tmp_path / "1.corrupt").exists()
  ck.close()


def test_explicit_broken_step_raises(tmp_path, mesh1):
  ck = checkpointing.Checkpointer(tmp_path, keep_last=3)
  save_steps(ck, [1, 2], mesh1)
  _delete_data_file(tmp_path / "2")
  with pytest.raises(ValueError, match=r"checkpoint .*2 is unusable because .* is missing"):
    ck.restore(2, abstract_state=abstract_state(mesh1))
  ck.close()


def test_save_rules_and_bad_input(tmp_path, mesh1):
  ck = checkpointing.Checkpointer(tmp_path, keep_last=3, save_interval_steps=2)
  state = make_state(1, mesh1)
  kw = {"state": state, "data_state": {"position": 0}, "config": CONFIG}
  assert not ck.save(1, **kw)  # not a multiple of 2
  assert ck.save(2, **kw)
  assert ck.save(3, force=True, **kw)
  assert not ck.save(3, force=True, **kw)  # exists already
  with pytest.raises(ValueError, match="finite number under 'uar'"):
    ck.save(4, metrics={"war": 50.0}, **kw)
  with pytest.raises(ValueError, match="finite number under 'uar'"):
    ck.save(4, metrics={"uar": float("nan")}, **kw)
  with pytest.raises(ValueError, match="'config' must be JSON-serialisable"):
    ck.save(4, state=state, data_state={}, config={"x": object()})
  with pytest.raises(ValueError, match="step must be a non-negative int"):
    ck.save(-1, **kw)
  ck.close()
  assert ck.all_steps() == [2, 3]
  with pytest.raises(ValueError, match="keep_last must be >= 1"):
    checkpointing.Checkpointer(tmp_path, keep_last=0)
  with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
    checkpointing.read_config(tmp_path / "nothing_here")


@pytest.mark.parametrize("keep_best,kept,best", [(True, [2, 3], 2), (False, [3], 3)])
def test_min_mode_and_keep_best_off(tmp_path, mesh1, keep_best, kept, best):
  ck = checkpointing.Checkpointer(
    tmp_path, keep_last=1, keep_best=keep_best, best_metric="loss", best_mode="min"
  )
  save_steps(ck, [1, 2, 3], mesh1, {1: {"loss": 0.5}, 2: {"loss": 0.1}, 3: {"loss": 0.3}})
  assert ck.all_steps() == kept
  assert ck.best_step() == best  # the best among the kept steps
  ck.close()


def test_partial_save_of_interrupted_run_is_ignored(tmp_path, mesh1, caplog):
  ck = checkpointing.Checkpointer(tmp_path, keep_last=3)
  save_steps(ck, [1], mesh1)
  ck.close()
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what a kill during a save leaves
  (partial / "state").mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    ck = checkpointing.Checkpointer(tmp_path, keep_last=3)
  assert any(
    str(partial) in r.getMessage() and "partial save" in r.getMessage() for r in caplog.records
  )
  assert ck.latest_valid_step() == 1 and ck.all_steps() == [1]
  step, *_ = ck.restore("latest", abstract_state=abstract_state(mesh1))
  assert step == 1
  ck.close()


def test_permission_denied_stops_with_the_cause_and_renames_nothing(tmp_path, mesh1, monkeypatch):
  """A failure to open a file that is no evidence of damage (here the newest step's metadata
  cannot be opened: permission denied) stops every way of choosing a step, names the file and
  the cause, and renames nothing: the step is not skipped for the previous one."""
  ck = checkpointing.Checkpointer(tmp_path, keep_last=5)
  save_steps(ck, [1, 2], mesh1)
  denied = tmp_path / "2" / checkpointing.STEP_METADATA_FILE
  real_open = pathlib.Path.open

  def guarded_open(self, *args, **kwargs):
    if self == denied:
      raise PermissionError(13, "Permission denied", str(self))
    return real_open(self, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "open", guarded_open)
  said = rf"{re.escape(str(tmp_path / '2'))}: reading {checkpointing.STEP_METADATA_FILE} failed "
  said += r"with PermissionError: .*Permission denied"
  for choose in (
    ck.latest_valid_step,
    lambda: ck.restore("latest", abstract_state=abstract_state(mesh1)),
    lambda: checkpointing.step_dir(tmp_path, "latest", metric="uar"),
  ):
    with pytest.raises(checkpointing.CheckpointAccessError, match=said):
      choose()
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]
  assert ck.latest_valid_step() == 2
  ck.close()
