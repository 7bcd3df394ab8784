"""Training logs: TensorBoard event files, a JSON-lines history and a console progress line.

Only process 0 writes (multi-host runs would otherwise write N copies of every event).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Mapping

import jax


def _is_primary() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """Scalars to `<workdir>/tensorboard` (readable by `tensorboard --logdir`) and
  `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = _is_primary()
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30)
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      if v is not None:
        self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(
      json.dumps(
        {"step": int(step), **{k: (None if v is None else float(v)) for k, v in scalars.items()}}
      )
      + "\n"
    )
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """One console line per log interval: epoch, step, loss, clips/s and ETA."""

  def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int = 0):
    self.total = total_steps
    self.per_epoch = steps_per_epoch
    self.start_step = start_step
    self.t0 = time.perf_counter()
    self.enabled = _is_primary()

  def line(self, step: int, loss: float, acc: float, clips_per_s: float) -> str:
    done = step - self.start_step
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    epoch = step / max(self.per_epoch, 1)
    return (
      f"epoch {epoch:6.2f} | step {step:>7}/{self.total} | loss {loss:8.4f} | "
      f"acc {100 * acc:5.1f}% | {clips_per_s:8.1f} clips/s | ETA {_hms(eta)}"
    )

  def print(self, step: int, loss: float, acc: float, clips_per_s: float) -> None:
    if self.enabled:
      print(self.line(step, loss, acc, clips_per_s), file=sys.stdout, flush=True)


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
