"""Multi-process training on the CPU through launch/local.sh (jax.distributed over 127.0.0.1).

One tiny demo run in 2 processes x 4 fake devices and the same run in 1 process x 8 devices:
equal losses and parameters, identical evaluation, although process 0's guarded work (the
dataset step) is made to last longer than the 30 s after which a device collective's set-up gives
up; the 2-process checkpoint restores and evaluates in 1 process; the processes agree on the
resume step when only one of them sees a broken checkpoint; a failure of process 0 in guarded
work stops every process at once with its message; the launcher stops every process when one
fails. Every subprocess runs under a timeout and is killed (its whole process group) on the way
out, pass or fail.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from dfer_clip_jax import distributed, train

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
sys.path.insert(0, str(REPO / "tests"))
from test_train import TINY_ARGS, TINY_OVERRIDES  # noqa: E402  pylint: disable=g-import-not-at-top

RUN_TIMEOUT_S = 240  # one launcher call; a 2-process run takes ~70 s on 2 cores (+ PRIMARY_DELAY_S)
# Process 0 sleeps this long inside the guarded dataset step of the 2-process run: longer than the
# 30 s a gloo collective's set-up waits, which is what the helpers of `distributed` once used.
PRIMARY_DELAY_S = 35
WAIT_LOG_EVERY_S = 10
# Two epochs of 3 steps, a checkpoint every 2 steps and at each epoch's end (steps 2, 3, 4, 6;
# the newest two and the best are kept). The 1-process run is also the uninterrupted run the
# preemption test compares with. SGD (the paper's
# optimizer) rather than the demo's AdamW: parameters whose exact gradient is zero (attention key
# biases: softmax ignores a shift shared by all keys) get float-noise gradients that differ with
# the device layout, and Adam scales any noise up to a full learning-rate step.
OVERRIDES = {
  **TINY_OVERRIDES,
  "mesh.data": -1,  # every device of the process: the sharded layout is what is tested here
  "train.epochs": 2,
  "train.checkpoint_every_steps": 2,
  "optim.name": "sgd",
}


def _cli(synth: pathlib.Path) -> list[str]:
  out = [
    f"--config={REPO / 'configs' / 'demo.py'}:{TINY_ARGS}",
    f"--config.data.synthetic_dir={synth}",
  ]
  # A hang fails within 2 minutes rather than the default hour.
  return (
    out
    + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    + ["--config.distributed.wait_timeout_s=120"]
  )


def _kill_groups(logdir: pathlib.Path) -> None:
  """Kills every process group local.sh started (it records their leaders in `pids`)."""
  pids = logdir / "pids"
  if not pids.is_file():
    return
  for pid in pids.read_text().split():
    try:
      os.killpg(int(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def launch(
  logdir: pathlib.Path, *args: str, n: int, devices: int, env=None, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
  """Runs launch/local.sh (in its own session) and always cleans up what it started."""
  cmd = [
    "bash",
    str(LAUNCH / "local.sh"),
    "-n",
    str(n),
    "-d",
    str(devices),
    "--logdir",
    str(logdir),
    "--timeout",
    str(int(timeout) - 15),
    *args,
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env={**os.environ, **(env or {})},
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    out = "(launcher timed out)"
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGTERM)  # local.sh's trap stops its children
      try:
        proc.wait(timeout=15)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _kill_groups(logdir)
  return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _check(result: subprocess.CompletedProcess, logdir: pathlib.Path) -> None:
  if result.returncode != 0:
    logs = "".join(
      f"\n--- {p.name} ---\n" + p.read_text()[-3000:] for p in sorted(logdir.glob("process_*.log"))
    )
    pytest.fail(f"launcher exited with {result.returncode}:\n{result.stdout[-2000:]}{logs}")


def _losses(workdir: pathlib.Path) -> np.ndarray:
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return np.array([x["train/loss"] for x in lines if "train/loss" in x])


def _restore_numpy(step_dir: pathlib.Path):
  """A saved train state as numpy arrays, whatever mesh wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(step_dir / "state")
  meta = ocp.StandardCheckpointHandler().metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny run in 1 process x 8 devices and in 2 processes x 4, then the 2-process
  checkpoint evaluated by 1 process (--mode=eval)."""
  from dfer_clip_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("dist")
  synth = root / "synth"
  synthetic.generate(synth, num_classes=7, num_clips=42, seed=0, image_size=24, processes=1)
  # The runs share the session's compilation cache (conftest.py): the 1-process eval reuses the
  # 1-process run's programs, the preemption test these runs' programs.
  env = {}
  slow_primary = {
    distributed.ENV_TEST_PRIMARY_DELAY: f"{PRIMARY_DELAY_S}:generating",
    distributed.ENV_WAIT_LOG_EVERY: str(WAIT_LOG_EVERY_S),
  }
  out = {}
  for name, n, devices in (("one", 1, 8), ("two", 2, 4)):
    workdir, logdir = root / name, root / f"{name}_logs"
    _check(
      launch(
        logdir,
        "--",
        f"--workdir={workdir}",
        *_cli(synth),
        n=n,
        devices=devices,
        env={**env, **slow_primary} if n > 1 else env,
      ),
      logdir,
    )
    out[name], out[f"{name}_logs"] = workdir, logdir
  logdir = root / "eval_logs"
  _check(
    launch(
      logdir,
      "--",
      f"--workdir={out['two']}",
      *_cli(synth),
      "--mode=eval",
      "--checkpoint=latest",
      n=1,
      devices=8,
      env=env,
    ),
    logdir,
  )
  out["eval_logs"], out["synth"] = logdir, synth
  return out


def _assert_same_state(a, b) -> None:
  """Two saved train states (numpy trees) hold the same parameters and optimizer state."""
  import jax  # pylint: disable=g-import-not-at-top

  # The same trees (names and shapes) before any leaf is compared.
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert [x.shape for x in jax.tree.leaves(a)] == [y.shape for y in jax.tree.leaves(b)]
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a["model"])[0], jax.tree.leaves(b["model"])
  ):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # Momentum traces accumulate gradients summed in another order (the cross-process
  # all-reduce): compared relative to each tensor's largest entry.
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a["optimizer"])[0], jax.tree.leaves(b["optimizer"])
  ):
    scale = float(np.abs(x).max()) if np.size(x) else 0.0
    np.testing.assert_allclose(
      y, x, rtol=1e-4, atol=1e-4 * max(scale, 1.0), err_msg=jax.tree_util.keystr(path)
    )


def test_two_processes_train_like_one(runs):
  one, two = runs["one"], runs["two"]
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-5)
  assert len(_losses(two)) == 6  # written once (process 0), not once per process
  _assert_same_state(
    _restore_numpy(one / "checkpoints" / "6"), _restore_numpy(two / "checkpoints" / "6")
  )


def test_sigterm_to_one_process_saves_an_agreed_step_and_resumes(runs, tmp_path):
  """SIGTERM to process 1 after step 1 of a 6-step 2-process run: both processes save the step
  jax's preemption service names, stop with the preemption status, and the rerun of the same
  command resumes there and ends with the state of an uninterrupted run."""
  from dfer_clip_jax import preemption  # pylint: disable=g-import-not-at-top

  args = _cli(runs["synth"])
  ref = runs["one"]  # the same command, uninterrupted, in one process
  workdir, logdir = tmp_path / "preempted", tmp_path / "preempted_logs"
  result = launch(
    logdir,
    "--",
    f"--workdir={workdir}",
    *args,
    n=2,
    devices=4,
    env={preemption.ENV_TEST_SIGNAL: "1:1"},
  )
  assert result.returncode == preemption.PREEMPTED_EXIT_CODE, result.stdout[-3000:]
  log0 = (logdir / "process_0.log").read_text()
  saved = re.search(r"preempted: checkpoint of step (\d+) saved", log0)
  assert saved, log0[-3000:]
  step = int(saved.group(1))
  assert 1 < step < 6  # the step both reached after the notice, before the end
  assert (workdir / "checkpoints" / str(step) / "commit_success.txt").is_file()
  assert not (workdir / "report.json").exists()
  logdir = tmp_path / "resume_logs"
  _check(launch(logdir, "--", f"--workdir={workdir}", *args, n=2, devices=4), logdir)
  assert f"Resumed from checkpoint step {step}" in (logdir / "process_0.log").read_text()
  _assert_same_state(
    _restore_numpy(ref / "checkpoints" / "6"), _restore_numpy(workdir / "checkpoints" / "6")
  )


def test_two_processes_evaluate_like_one(runs):
  one, two = runs["one"], runs["two"]
  r1 = json.loads((one / "report.json").read_text())
  r2 = json.loads((two / "report.json").read_text())
  assert r2["history"] == r1["history"]  # per-epoch val / test UAR and WAR
  assert r2["rows"] == r1["rows"]
  for key in ("uar", "war", "confusion_matrix", "counts"):
    assert r2["last_test"][key] == r1["last_test"][key], key
  p1 = (one / "eval/last/predictions.csv").read_text().splitlines()
  p2 = (two / "eval/last/predictions.csv").read_text().splitlines()
  assert len(p2) == len(p1) == r1["last_test"]["counts"]["total"] + 1  # every clip once
  for l1, l2 in zip(p1[1:], p2[1:]):
    f1, f2 = l1.split(","), l2.split(",")
    assert f1[:5] == f2[:5]  # clip id, label, its name, prediction, its name
    # Parameters agree to 1e-5 after the 6 steps (all-reduce order); the logit scale of 100
    # amplifies that in the probabilities.
    np.testing.assert_allclose(np.float64(f2[5:]), np.float64(f1[5:]), atol=1e-4)


def test_only_process_zero_writes(runs):
  two = runs["two"]
  assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
  log0 = (runs["two_logs"] / "process_0.log").read_text()
  log1 = (runs["two_logs"] / "process_1.log").read_text()
  assert "Report:" in log0 and "Report:" not in log1
  assert re.search(r"step +6/6 \| loss", log0) and not re.search(r"step +\d+/6", log1)
  # Both processes wrote their shards of the checkpoint (Orbax: one OCDBT folder per process).
  state = two / "checkpoints" / "6" / "state"
  assert sorted(p.name for p in state.glob("ocdbt.process_*")) == [
    "ocdbt.process_0",
    "ocdbt.process_1",
  ]


def test_processes_wait_for_long_work_on_process_zero(runs):
  """The 2-process run above trained like one process although process 1 waited longer for
  process 0's dataset step than a device collective would have; it said what it waited for."""
  log0 = (runs["two_logs"] / "process_0.log").read_text()
  log1 = (runs["two_logs"] / "process_1.log").read_text()
  assert f"process 0 sleeps {PRIMARY_DELAY_S} s before generating the synthetic dataset" in log0
  waits = re.findall(
    r"process 1: waiting for process 0 \(generating the synthetic dataset\) "
    r"for (\d+) s so far; giving up after 120 s",
    log1,
  )
  # 10, 20, 30 s (and more if process 1 reached the step before process 0 did).
  assert [int(w) for w in waits][:3] == [10, 20, 30], log1[-3000:]


def test_two_process_checkpoint_evaluates_in_one_process(runs):
  two = runs["two"]
  report = json.loads((two / "report.json").read_text())
  metrics = json.loads((two / "eval/latest/metrics.json").read_text())
  for key in ("uar", "war", "confusion_matrix", "counts"):
    assert metrics[key] == report["last_test"][key], key
  assert (two / "eval/latest/predictions.csv").read_text() == (
    two / "eval/last/predictions.csv"
  ).read_text()


def test_processes_agree_on_the_resume_step(runs, tmp_path):
  ckpt = tmp_path / "checkpoints"
  shutil.copytree(runs["two"] / "checkpoints", ckpt)
  for extra in ckpt.iterdir():  # the two newest steps: 4 and 6
    if extra.name not in ("4", "6"):
      shutil.rmtree(extra)
  assert sorted(p.name for p in ckpt.iterdir()) == ["4", "6"]
  out = tmp_path / "out"
  out.mkdir()
  logdir = tmp_path / "logs"
  result = launch(
    logdir,
    "--module",
    "distributed_worker",
    "--",
    "--mode=agree",
    f"--ckpt={ckpt}",
    f"--out={out}",
    n=2,
    devices=2,
    env={"PYTHONPATH": str(REPO / "tests")},
    timeout=120,
  )
  _check(result, logdir)
  got = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
  for i, g in enumerate(got):
    assert (g["process"], g["count"]) == (i, 2)
    assert g["broadcast"] == {"from": 0, "text": "x" * 100}
    assert g["gathered"] == [[0], [1, 1]]
    assert g["newest"] == 6
    # Process 1 alone saw step 6 as broken: both restore step 4, and step 6 is set aside.
    assert g["agreed"] == 4
    assert g["dirs_after"] == ["4", "6.corrupt"]
  assert got[0]["run_on_primary_error"] == "KeyError: 'only process 0 runs this'"
  assert got[1]["run_on_primary_error"].startswith("PrimaryFailedError: process 0 failed")
  assert [g["every"] for g in got] == [[0, 10]] * 2
  assert [g["first_writer"] for g in got] == ["0", "0"]
  assert got[0]["out_of_step"].startswith("process 1 was on step 1 while process 0 was on step 0")
  assert got[1]["out_of_step"].startswith("process 0 was on step 0 while process 1 was on step 1")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_failure_on_process_zero_stops_every_process_with_its_message(tmp_path):
  """Process 0 fails inside `run_on_primary` after a delay; process 1, waiting for it (and
  saying so), exits at once with process 0's message. The two processes are started directly,
  not through local.sh, which would stop process 1 itself."""
  delay, port = 8, _free_port()
  procs, logs = [], [tmp_path / f"process_{i}.log" for i in range(2)]
  try:
    for i, log in enumerate(logs):
      env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        "DFER_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "DFER_NUM_PROCESSES": "2",
        "DFER_PROCESS_ID": str(i),
        distributed.ENV_WAIT_LOG_EVERY: "2",
      }
      with open(log, "w") as f:
        procs.append(
          subprocess.Popen(
            [
              sys.executable,
              "-m",
              "distributed_worker",
              "--mode=primary_fails",
              f"--delay={delay}",
              "--wait_timeout_s=60",
            ],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
          )
        )
    ended = [None, None]
    deadline = time.time() + 90
    while None in ended and time.time() < deadline:
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.time()
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  out = [log.read_text() for log in logs]
  assert None not in ended, out
  assert [p.returncode for p in procs] == [1, 1], out
  failed_at = float(re.search(r"failing at ([\d.]+)", out[0]).group(1))
  assert "RuntimeError: process 0 gave up on purpose" in out[0]
  assert (
    "PrimaryFailedError: process 0 failed while testing a slow failure: RuntimeError: "
    "process 0 gave up on purpose"
  ) in out[1]
  assert "process 1: waiting for process 0 (testing a slow failure)" in out[1]
  assert max(ended) - failed_at < 10, (ended, failed_at)  # promptly, not at a time-out


def test_launcher_stops_everyone_when_one_process_fails(tmp_path):
  start = time.monotonic()
  result = launch(
    tmp_path,
    "--module",
    "distributed_worker",
    "--",
    "--mode=fail",
    n=3,
    devices=1,
    env={"PYTHONPATH": str(REPO / "tests")},
    timeout=60,
  )
  assert result.returncode == 3, result.stdout
  assert "process 1 (pid" in result.stdout and "failed with exit status 3" in result.stdout
  assert time.monotonic() - start < 30  # the sleeping processes were stopped, not waited for
  for pid in (tmp_path / "pids").read_text().split():
    with pytest.raises(ProcessLookupError):
      os.kill(int(pid), 0)


def test_launch_scripts_print_and_check(tmp_path):
  for script in ("local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=30)
  dry = subprocess.run(
    [
      "bash",
      str(LAUNCH / "local.sh"),
      "--dry-run",
      "-n",
      "2",
      "-d",
      "4",
      "--logdir",
      str(tmp_path / "never"),
      "--",
      "--workdir=w x",
    ],
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert dry.returncode == 0, dry.stderr
  assert "DFER_PROCESS_ID=1" in dry.stdout and "device_count=4" in dry.stdout
  assert "--workdir=w\\ x" in dry.stdout and not (tmp_path / "never").exists()
  pod_env = {
    **os.environ,
    "TPU_NAME": "t",
    "ZONE": "us-central2-b",
    "BUCKET": "b",
    "RUN_DIR": "runs/r",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
  }
  pod = subprocess.run(
    ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--create", "--", "--config=configs/demo.py"],
    env=pod_env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert pod.returncode == 0, pod.stderr
  assert "tpu-vm create t" in pod.stdout and "--worker=all" in pod.stdout
  assert "--workdir=/mnt/gcs/b/runs/r --config.distributed.initialize=True" in pod.stdout
  del pod_env["BUCKET"]
  missing = subprocess.run(
    ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run"],
    env=pod_env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert missing.returncode != 0 and "BUCKET is not set" in missing.stderr
  slurm = subprocess.run(
    ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--dry-run", "--config=configs/demo.py"],
    env={**os.environ, "WORKDIR": "/shared/run"},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert slurm.returncode == 0, slurm.stderr
  assert "srun --kill-on-bad-exit=1" in slurm.stdout
  assert "--config.distributed.initialize=True" in slurm.stdout
  no_workdir = subprocess.run(
    ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--dry-run"],
    env={k: v for k, v in os.environ.items() if k != "WORKDIR"},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert no_workdir.returncode != 0 and "set WORKDIR" in no_workdir.stderr


def _cfg(**kw):
  base = {"initialize": False, "coordinator_address": "", "num_processes": 0, "process_id": -1}
  return ml_collections.ConfigDict({**base, **kw})


def test_resolve_distributed_settings():
  assert distributed.resolve(_cfg(), environ={}) is None
  assert distributed.resolve(_cfg(initialize=True), environ={}) == {}  # cluster detection
  env = {
    "DFER_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "DFER_NUM_PROCESSES": "4",
    "DFER_PROCESS_ID": "3",
  }
  assert distributed.resolve(_cfg(), environ=env) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 3,
  }
  assert distributed.resolve(_cfg(process_id=0), environ=env)["process_id"] == 0  # config wins
  with pytest.raises(ValueError, match="host:port"):
    distributed.resolve(_cfg(coordinator_address="10.0.0.1"), environ={})
  with pytest.raises(ValueError, match=r"process_id 4 must lie in \[0, 4\)"):
    distributed.resolve(_cfg(), environ={**env, "DFER_PROCESS_ID": "4"})
  with pytest.raises(ValueError, match="DFER_NUM_PROCESSES='two'"):
    distributed.resolve(_cfg(), environ={**env, "DFER_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="would not know each other"):
    distributed.resolve(_cfg(num_processes=2, process_id=1), environ={})


def test_url_workdir_is_refused_with_what_to_do():
  with pytest.raises(ValueError, match="gcsfuse"):
    train.local_workdir("gs://bucket/runs/x")
  assert train.local_workdir("/mnt/gcs/bucket/runs/x") == pathlib.Path("/mnt/gcs/bucket/runs/x")
