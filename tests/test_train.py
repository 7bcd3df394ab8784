"""The main job end to end on tiny shapes: configs, training, checkpoints, resume, evaluation."""

import csv
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dfer_clip_jax import evaluate, train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo, dfew, ferv39k, mafw  # noqa: E402  pylint: disable=g-import-not-at-top
from dfer_clip_jax import config_lib  # noqa: E402

# Tiny run: 42 synthetic clips of 24 px, 4 frames at 16 px, batch 8, 2 epochs.
TINY_ARGS = "clips=42,epochs=2,frames=4"
TINY_OVERRIDES = {
  "data.synthetic_size": 24,
  "clip.image_size": 16,
  "train.batch_size": 8,
  "train.eval_batch_size": 8,
  "train.checkpoint_every_steps": 2,
  "train.log_every_steps": 1,
  "data.validate": True,
  # One device: the runs here test training, checkpoints and reports, and on 8 fake CPU devices
  # each save and restore compiles many small per-shard programs (2-3x the run's time). The
  # 8-device layout is tested where it is the subject (one vs eight devices, test_distributed).
  "mesh.data": 1,
}


def tiny_config(workdir_synth, **extra):
  c = demo.get_config(TINY_ARGS)
  with c.unlocked():
    config_lib.apply_preset(c, {**TINY_OVERRIDES, **extra})
    c.data.synthetic_dir = str(workdir_synth)
  return c


def cli_overrides(workdir_synth, **extra):
  out = [
    f"--config={REPO / 'configs' / 'demo.py'}:{TINY_ARGS}",
    f"--config.data.synthetic_dir={workdir_synth}",
  ]
  out += [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **extra}.items()]
  return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """The synthetic dataset, generated once for the module."""
  from dfer_clip_jax.data import synthetic

  root = tmp_path_factory.mktemp("synth")
  synthetic.generate(root, num_classes=7, num_clips=42, seed=0, image_size=24, processes=1)
  return root


@pytest.fixture(scope="module")
def finished_run(synth, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  report = train.train_and_evaluate(tiny_config(synth), workdir)
  return workdir, report


def test_all_configs_parse_and_typos_fail():
  for module in (dfew, mafw):
    for fold in range(1, 6):
      assert module.get_config(f"fold={fold}").fold == fold
  ferv39k.get_config()
  for arg in (
    "variant=B/16",
    "variant=L/14",
    "ctx=4",
    "ctx=16",
    "depth=0",
    "depth=3",
    "text=class_name",
    "text=name_with_context",
    "text=template",
    "baseline=zeroshot",
    "baseline=linear_probe",
    "baseline=finetune",
    "baseline=finetune_tm",
    "baseline=coop",
    "protocol=paper",
  ):
    dfew.get_config(arg)
  paper = dfew.get_config()
  assert (paper.clip.variant, paper.model.n_ctx, paper.model.temporal_depth) == ("B/32", 8, 1)
  assert paper.model.text_type == "descriptor" and paper.optim.name == "sgd"
  assert tuple(paper.optim.milestones) == (30, 40) and paper.train.batch_size == 48
  assert paper.train.epochs == 50 and not paper.model.normalize and paper.clip.dtype == "float32"
  with pytest.raises(ValueError, match="unknown config argument 'flod'"):
    dfew.get_config("flod=2")
  with pytest.raises(ValueError, match="folds 1..5"):
    mafw.get_config("fold=6")
  with pytest.raises(AttributeError):
    paper.train.epoch = 3  # locked: a misspelled key fails
  with pytest.raises(ValueError, match="baseline"):
    dfew.get_config("baseline=nope")
  demo.get_config()
  assert config_lib.parse_arg("a=3,b", a=1, b=False).to_dict() == {"a": 3, "b": True}


def test_main_rejects_unknown_override(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dfer_clip_jax.main",
      f"--config={REPO / 'configs/dfew.py'}",
      f"--workdir={tmp_path}",
      "--config.train.epochz=3",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert proc.returncode != 0
  assert "epochz" in proc.stderr


def test_train_and_evaluate_writes_everything(finished_run):
  workdir, report = finished_run
  rows = report["rows"]
  assert set(rows) == {"last epoch", "best by validation", "paper protocol (selected on test)"}
  assert len(report["history"]) == 2
  for name in (
    "report.json",
    "metrics.jsonl",
    "eval/last/metrics.json",
    "eval/last/predictions.csv",
    "eval/last/confusion_matrix.png",
  ):
    assert (workdir / name).is_file(), name
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_lines = [x for x in lines if "train/loss" in x]
  assert {
    "train/loss",
    "train/accuracy",
    "train/grad_norm",
    "train/param_norm",
    "train/clips_per_s",
    "lr/image",
    "lr/temporal",
    "lr/prompt",
  } <= set(train_lines[0])
  with open(workdir / "eval/last/predictions.csv") as fh:
    rows_csv = list(csv.DictReader(fh))
  assert len(rows_csv) == report["last_test"]["counts"]["total"]
  for r in rows_csv:
    probs = [float(v) for k, v in r.items() if k.startswith("prob_")]
    assert abs(sum(probs) - 1) < 1e-4


def test_eval_mode_reproduces_final_metrics(finished_run, synth):
  workdir, report = finished_run
  result = evaluate.evaluate_checkpoint(tiny_config(synth), workdir, "latest")
  assert result["uar"] == report["last_test"]["uar"]
  assert result["war"] == report["last_test"]["war"]
  assert result["confusion_matrix"] == report["last_test"]["confusion_matrix"]


def test_eval_mode_reads_and_validates_only_the_test_split(finished_run, synth, monkeypatch):
  """--mode=eval validates the clips it evaluates, not the training list (a broken training
  list does not matter to it), and leaves the run's skipped_clips.txt alone."""
  from dfer_clip_jax.data import validate  # pylint: disable=g-import-not-at-top

  workdir, report = finished_run
  validated = []
  real = validate.validate_clips
  monkeypatch.setattr(
    validate, "validate_clips", lambda anns, **kw: validated.append(len(anns)) or real(anns, **kw)
  )
  config = tiny_config(
    synth,
    **{
      "data.source": "folders",
      "data.train_list": str(synth / "no_such_train_list.txt"),
      "data.test_list": str(synth / "test.txt"),
    },
  )
  result = evaluate.evaluate_checkpoint(config, workdir, "latest")
  assert validated == [report["last_test"]["counts"]["total"]]
  assert result["war"] == report["last_test"]["war"]
  # The demo's synthetic source likewise (its generated training list is not read).
  validated.clear()
  evaluate.evaluate_checkpoint(tiny_config(synth), workdir, "latest")
  assert validated == [report["last_test"]["counts"]["total"]]


def test_rerun_of_finished_run_does_not_train_again(finished_run, synth, monkeypatch):
  """No step runs: no new checkpoint, no new metrics line, the train step never called."""
  workdir, report = finished_run
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  metrics = (workdir / "metrics.jsonl").read_text()

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run built its train step again")

  monkeypatch.setattr(train, "make_train_step", no_training)
  again = train.train_and_evaluate(tiny_config(synth), workdir)
  assert again["rows"] == report["rows"]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_eval_mode_with_a_relative_workdir(finished_run, synth, monkeypatch):
  """`--workdir=runs/demo` as the README types it: a path relative to the current folder."""
  workdir, _ = finished_run
  monkeypatch.chdir(workdir.parent)
  result = evaluate.evaluate_checkpoint(tiny_config(synth), workdir.name, "latest")
  assert result["step"] is not None


def test_kill_and_resume_is_bit_identical(finished_run, synth, tmp_path):
  """SIGKILL a run mid-training, rerun the same command: same predictions as an uninterrupted
  run (same devices, CPU)."""
  ref_dir, _ = finished_run
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "dfer_clip_jax.main", f"--workdir={workdir}", *cli_overrides(synth)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  ckpt = workdir / "checkpoints"
  try:
    # Kill once a mid-run checkpoint (step 2 or 4 of 6) is complete.
    while time.time() < deadline and proc.poll() is None:
      steps = [
        p for p in ckpt.glob("[0-9]*") if p.name.isdigit() and (p / "commit_success.txt").exists()
      ]
      if any(int(p.name) in (2, 4) for p in steps):
        break
      time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (workdir / "report.json").exists()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from checkpoint step" in done.stdout
  assert (workdir / "eval/last/predictions.csv").read_text() == (
    ref_dir / "eval/last/predictions.csv"
  ).read_text()


def test_corrupt_latest_checkpoint_falls_back(finished_run, synth, tmp_path, caplog):
  """Evaluation and a rerun of the training command both fall back to the previous step, and
  each reports the broken step once (one message per problem)."""
  ref_dir, _ = finished_run
  workdir = tmp_path / "copy"
  shutil.copytree(ref_dir, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  latest = workdir / "checkpoints" / str(steps[-1])
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])  # truncate the array data

  def reports():
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    return [m for m in said if f"{latest} is unusable" in m]

  with caplog.at_level(logging.WARNING):
    result = evaluate.evaluate_checkpoint(tiny_config(synth), workdir, "latest")
    assert result["step"] == steps[-2]
    assert len(reports()) == 1
    train.train_and_evaluate(tiny_config(synth), workdir)  # resumes from steps[-2]
    assert len(reports()) == 1
  assert (workdir / "checkpoints" / f"{steps[-1]}.corrupt").is_dir()


def test_one_device_and_eight_devices_agree(synth, tmp_path):
  """The same first steps on 1 device, on 8 (data parallel) and on 8 with FSDP sharding."""
  assert jax.device_count() == 8
  losses = {}
  for name, mesh in (
    ("1", dict(data=1, fsdp=1)),
    ("8", dict(data=8, fsdp=1)),
    ("fsdp", dict(data=2, fsdp=4)),
  ):
    c = tiny_config(synth, **{"train.epochs": 1})
    with c.unlocked():
      c.mesh.data, c.mesh.fsdp = mesh["data"], mesh["fsdp"]
      c.mesh.fsdp_min_size = 1024
    trainer = train.Trainer(c, tmp_path / name)
    try:
      trainer.fit()
    finally:
      trainer.checkpointer.close()
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses[name] = np.array([x["train/loss"] for x in lines if "train/loss" in x])
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses["fsdp"], losses["1"], rtol=1e-5, atol=1e-5)


def test_non_finite_loss_stops_with_step_and_keeps_the_last_good_checkpoint(
  synth, tmp_path, monkeypatch
):
  """The learning rates become infinite after step 2 (saved): the run stops naming the first
  non-finite step, 3, before the epoch-end save, and the kept step 2, which evaluates."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax import state as state_lib  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(
    state_lib,
    "make_schedule",
    lambda config, steps_per_epoch: lambda count: jnp.where(count < 2, 1.0, jnp.inf),
  )
  workdir = tmp_path / "nan"
  with pytest.raises(
    train.NonFiniteError, match=r"at step 3 .*last good checkpoint \(step 2\) is kept"
  ) as info:
    train.train_and_evaluate(tiny_config(synth), workdir)
  assert "non-finite" in str(info.value)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]
  result = evaluate.evaluate_checkpoint(tiny_config(synth), workdir, "2")
  assert result["step"] == 2 and np.isfinite(result["uar"])


def test_folds_summary_reuses_finished_folds(finished_run, synth, tmp_path, capsys):
  from dfer_clip_jax import folds

  ref_dir, report = finished_run
  shutil.copytree(ref_dir, tmp_path / "fold1")
  summary = folds.run_folds(tiny_config(synth), tmp_path)
  assert "finished earlier" in capsys.readouterr().out
  last = summary["last epoch"]
  assert last["num_folds"] == 1
  assert last["uar"]["mean"] == pytest.approx(report["rows"]["last epoch"]["uar"])
  assert "mean" in (tmp_path / "folds.md").read_text()
  assert json.loads((tmp_path / "folds.json").read_text())["last epoch"]["num_folds"] == 1


def test_eval_mode_on_converted_reference_checkpoint(synth, tmp_path, reference_dir):
  """`--mode=eval --checkpoint=DIR` accepts a reference checkpoint converted by the CLI."""
  from dfer_clip_jax.conversion import reference

  imported = reference.load_reference_checkpoint(reference_dir / "tiny_forward.npz")
  export = reference.export_model(imported.model, imported.clip_config, tmp_path / "export")
  result = evaluate.evaluate_checkpoint(tiny_config(synth), tmp_path / "wd", str(export))
  n_test = len((synth / "test.txt").read_text().splitlines())
  assert result["step"] is None and result["counts"]["total"] == n_test
  assert (tmp_path / "wd" / "eval" / "export" / "predictions.csv").is_file()


def test_cudnn_failures_name_the_setting_that_avoids_them():
  from dfer_clip_jax import train as train_lib

  with pytest.raises(RuntimeError, match="attention_impl=xla") as info:
    with train_lib._explain_attention_failure("auto"):
      raise ValueError("INTERNAL: cuDNN graph failed to build")
  assert isinstance(info.value.__cause__, ValueError)
  for impl, err in (("xla", ValueError("cuDNN says no")), ("auto", KeyError("other"))):
    with pytest.raises(type(err)):
      with train_lib._explain_attention_failure(impl):
        raise err


def test_custom_dataset_with_a_classes_file_trains_and_evaluates(synth, tmp_path):
  """A user's own dataset: class names from classes.txt, annotation lists in the reference
  format (here the synthetic clips under other names), a tiny training run, then --mode=eval."""
  names = ["calm", "joy", "grief", "rage", "shock", "revulsion", "dread"]
  classes_file = tmp_path / "classes.txt"
  classes_file.write_text("# one class per line, in label order\n" + "\n".join(names) + "\n")
  c = tiny_config(
    synth,
    **{
      "dataset": "custom",
      "data.source": "folders",
      "data.root": str(synth),
      "data.train_list": "train.txt",
      "data.test_list": "test.txt",
      "data.classes_file": str(classes_file),
      "model.text_type": "name_with_context",
      "train.epochs": 1,
    },
  )
  report = train.train_and_evaluate(c, tmp_path / "run")
  assert report["class_names"] == names and len(report["history"]) == 1
  with open(tmp_path / "run" / "eval/last/predictions.csv") as fh:
    header = next(csv.reader(fh))
  assert [h for h in header if h.startswith("prob_")] == [f"prob_{n}" for n in names]
  result = evaluate.evaluate_checkpoint(c, tmp_path / "run", "latest")
  assert result["uar"] == report["last_test"]["uar"]
  with pytest.raises(ValueError, match="data.classes_file"):
    from dfer_clip_jax.data import sources  # pylint: disable=g-import-not-at-top

    bad = tiny_config(synth, **{"dataset": "custom"})
    sources.class_names(bad)


def test_preemption_saves_the_step_and_resumes_to_the_same_result(
  finished_run, synth, tmp_path, monkeypatch
):
  """A SIGTERM after step 1 (not a checkpoint step): the run saves step 1, stops with the
  preemption exit status and says how to resume; the rerun resumes there and ends with the
  uninterrupted run's predictions. (Two processes agreeing on the step: test_distributed.)"""
  from dfer_clip_jax import preemption  # pylint: disable=g-import-not-at-top

  ref_dir, _ = finished_run
  workdir = tmp_path / "preempted"
  monkeypatch.setenv(preemption.ENV_TEST_SIGNAL, "0:1")
  with pytest.raises(preemption.Preempted, match="checkpoint of step 1 saved") as info:
    train.train_and_evaluate(tiny_config(synth), workdir)
  assert info.value.code == preemption.PREEMPTED_EXIT_CODE
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1] and not (workdir / "report.json").exists()
  monkeypatch.delenv(preemption.ENV_TEST_SIGNAL)
  train.train_and_evaluate(tiny_config(synth), workdir)
  assert (workdir / "eval/last/predictions.csv").read_text() == (
    ref_dir / "eval/last/predictions.csv"
  ).read_text()
