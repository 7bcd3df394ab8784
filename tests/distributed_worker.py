"""A program that tests/test_distributed.py runs in several processes through launch/local.sh.

--mode=fail: no JAX at all; process 1 exits with status 3 at once, the others sleep (the
    launcher must stop them).
--mode=agree: joins jax.distributed (DFER_* environment from local.sh) and exercises the
    collective helpers and the resume-step agreement on a copy of a checkpoints folder, where
    process 1 alone is made to see the newest step as broken. Each process writes what it got
    to OUT/process_<i>.json.
--mode=primary_fails: joins jax.distributed; process 0 fails inside `run_on_primary` after
    --delay seconds (it prints the time first); nothing catches the error.
"""

import argparse
import json
import os
import pathlib
import sys
import time


def _fail() -> None:
  if os.environ.get("DFER_PROCESS_ID") == "1":
    sys.exit(3)
  time.sleep(120)


def _initialize(wait_timeout_s: float) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(
    ml_collections.ConfigDict(
      {
        "initialize": False,
        "coordinator_address": "",
        "num_processes": 0,
        "process_id": -1,
        "wait_timeout_s": wait_timeout_s,
      }
    )
  )


def _primary_fails(delay: float) -> None:
  from dfer_clip_jax import distributed  # pylint: disable=g-import-not-at-top

  def slow_failure():
    time.sleep(delay)
    print(f"failing at {time.time()}", flush=True)
    raise RuntimeError("process 0 gave up on purpose")

  distributed.run_on_primary("testing a slow failure", slow_failure)


def _agree(ckpt_dir: pathlib.Path, out: pathlib.Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax import (
    checkpointing,  # pylint: disable=g-import-not-at-top
    distributed,  # pylint: disable=g-import-not-at-top
  )

  me = jax.process_index()
  result = {"process": me, "count": jax.process_count()}
  result["broadcast"] = distributed.broadcast_json({"from": me, "text": "x" * (100 * (me + 1))})
  result["gathered"] = distributed.gather_json([me] * (me + 1))

  def boom():
    raise KeyError("only process 0 runs this")

  try:
    distributed.run_on_primary("testing", boom)
  except Exception as e:  # pylint: disable=broad-exception-caught
    result["run_on_primary_error"] = f"{type(e).__name__}: {e}"
  result["every"] = distributed.run_on_every_process("testing", lambda: me * 10)
  with distributed.primary_first("testing"):
    first = out / "first.txt"
    if not first.exists():  # process 0 writes it; the others only read it
      first.write_text(str(me))
    result["first_writer"] = first.read_text()
  try:
    distributed.gather_json(me, what=f"on step {me}")  # out of step: each names its own step
  except RuntimeError as e:
    result["out_of_step"] = str(e)

  newest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  if me == 1:
    # This process alone sees the newest step as damaged (as a host with a stale view of a
    # network file system would): every process must still pick the same, older step.
    verify = checkpointing.verify_checkpoint

    def one_sided(step_dir):
      if pathlib.Path(step_dir).name == str(newest):
        return "a file is truncated (as seen by process 1 only)"
      return verify(step_dir)

    checkpointing.verify_checkpoint = one_sided
  ckptr = checkpointing.Checkpointer(ckpt_dir, keep_last=10)
  try:
    result["newest"] = newest
    result["agreed"] = checkpointing.agreed_latest_step(ckptr)
  finally:
    ckptr.close()
  result["dirs_after"] = sorted(p.name for p in ckpt_dir.iterdir())
  (out / f"process_{me}.json").write_text(json.dumps(result))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("fail", "agree", "primary_fails"), required=True)
  parser.add_argument("--ckpt", type=pathlib.Path)
  parser.add_argument("--out", type=pathlib.Path)
  parser.add_argument("--delay", type=float, default=0.0)
  parser.add_argument("--wait_timeout_s", type=float, default=60.0)
  args = parser.parse_args()
  if args.mode == "fail":
    _fail()
    return
  _initialize(args.wait_timeout_s)
  if args.mode == "primary_fails":
    _primary_fails(args.delay)
  else:
    _agree(args.ckpt, args.out)


if __name__ == "__main__":
  main()
