"""The preemption watch: a notice (SIGTERM or SIGUSR1) turns `reached` True; the previous
signal handlers come back afterwards. (Two processes agreeing on a step, and the trainer
saving there and resuming, are tested in tests/test_distributed.py.)"""

import os
import signal

import pytest

from dfer_clip_jax import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_notice_is_reached_at_the_next_step(sig):
  before = signal.getsignal(sig)
  with preemption.PreemptionWatch() as watch:
    assert not watch.multi_process  # one process: no agreement needed
    assert not watch.reached(1) and not watch.reached(2)
    os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
    assert watch.reached(3) and watch.reached(4)
  assert signal.getsignal(sig) is before


def test_preempted_exit_status_and_message():
  err = preemption.Preempted("saved step 7; rerun the same command to resume")
  assert isinstance(err, SystemExit) and err.code == preemption.PREEMPTED_EXIT_CODE != 1
  assert "rerun the same command" in str(err)
