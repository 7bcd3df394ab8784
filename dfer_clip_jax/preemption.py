"""Preemption: a notice (SIGTERM, or SIGUSR1 from a scheduler that sends it) makes every process
agree on a step, save a checkpoint there and exit cleanly, so a requeued run loses nothing.

Cloud TPU VMs get SIGTERM shortly before they are taken away; SLURM sends the signal `--signal`
asks for before the time limit or a preemption (`launch/slurm_gpu.sbatch` asks for SIGTERM).

Multi-process runs use jax's preemption service (started by `jax.distributed.initialize`): its
own SIGTERM handler tells the coordination service, which spreads the notice to every process and
names the step at which all of them save (the largest step any process reached, plus one), so
every process saves the same step. SIGUSR1 is turned into a SIGTERM to ourselves, which that
handler then sees. A single process needs no agreement: it saves after the step it is on.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run stopped by a notice after its checkpoint was saved: not 0 (the run did
# not finish) and not 1 (a failure), so a wrapper or scheduler can tell it apart and requeue.
PREEMPTED_EXIT_CODE = 42

# Test-only hook: "PROCESS:STEP" makes that process send itself SIGTERM after that step, so a
# test can preempt one process of a multi-process run at a known point.
ENV_TEST_SIGNAL = "DFER_TEST_SIGTERM_AT"


class Preempted(SystemExit):
  """Raised once the checkpoint at the agreed step is saved; the message says how to resume."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


def _service_running() -> bool:
  """Whether jax's distributed client (and with it the preemption service) is running."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return (
    distributed.global_state.client is not None
    and distributed.global_state.preemption_sync_manager is not None
  )


class PreemptionWatch:
  """`reached(step)`, called after every step on every process, turns True at the step where
  all processes save after a notice. A context manager: signal handlers are installed on entry
  (from the main thread) and the previous ones restored on exit."""

  def __init__(self):
    self._notice = threading.Event()
    self._previous: dict[int, object] = {}
    self.multi_process = False

  def __enter__(self) -> PreemptionWatch:
    self.multi_process = jax.process_count() > 1 and _service_running()
    if threading.current_thread() is threading.main_thread():
      # With the service, SIGTERM belongs to its handler; we only forward SIGUSR1 to it.
      signals = (signal.SIGUSR1,) if self.multi_process else (signal.SIGTERM, signal.SIGUSR1)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning(
      "preemption notice (%s): a checkpoint is saved at the next agreed step",
      signal.Signals(signum).name,
    )
    self._notice.set()
    if self.multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # the preemption service's own notice

  def reached(self, step: int) -> bool:
    """Whether every process should save after `step` and stop (collective in multi-process
    runs: call it at every step on every process)."""
    if os.environ.get(ENV_TEST_SIGNAL) == f"{jax.process_index()}:{step}":
      os.kill(os.getpid(), signal.SIGTERM)
    if self.multi_process:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._notice.is_set()
