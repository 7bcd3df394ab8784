"""Multi-process start-up (`jax.distributed`) and the few cross-process helpers the trainer needs.

One process per host (TPU VM worker, GPU node) or per GPU; every process runs the same program
and the same jitted step on global arrays. `initialize` starts `jax.distributed` when asked:

  * `config.distributed.initialize=True` with nothing else: JAX detects the cluster itself on
    Cloud TPU VMs, under SLURM (`srun`) and under Open MPI (`mpirun`).
  * anywhere else, an explicit coordinator: `coordinator_address` (host:port of process 0),
    `num_processes` and `process_id`, from the config or from the environment variables
    DFER_COORDINATOR_ADDRESS, DFER_NUM_PROCESSES and DFER_PROCESS_ID (what `launch/local.sh`
    sets). A coordinator address alone (no `initialize`) is enough to start.

After start-up, processes other than 0 log at WARNING level only, so that INFO lines are not
repeated N times (set DFER_LOG_ALL_PROCESSES=1 to keep every process's INFO log).

The helpers (`broadcast_json`, `gather_json`, `run_on_primary`, `primary_first`) are collective:
every process must call them in the same order. In a single process they cost nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import jax
import numpy as np

ENV_ADDRESS = "DFER_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DFER_NUM_PROCESSES"
ENV_PROCESS_ID = "DFER_PROCESS_ID"
ENV_LOG_ALL = "DFER_LOG_ALL_PROCESSES"


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
  raw = environ.get(name, "")
  if not raw:
    return default
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def resolve(cfg, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

  Config values win over the environment. An empty dict means "detect the cluster" (TPU VM,
  SLURM, Open MPI).
  """
  environ = os.environ if environ is None else environ
  address = cfg.coordinator_address or environ.get(ENV_ADDRESS, "")
  num = cfg.num_processes or _env_int(environ, ENV_NUM_PROCESSES, 0)
  pid = cfg.process_id if cfg.process_id >= 0 else _env_int(environ, ENV_PROCESS_ID, -1)
  if not (cfg.initialize or address):
    if num > 1 or pid >= 0:
      raise ValueError(
          f"num_processes={num} / process_id={pid} are set but neither "
          f"distributed.initialize nor a coordinator address ({ENV_ADDRESS} or "
          "--config.distributed.coordinator_address=host:port) is: the processes would not "
          "know each other")
    return None
  if num < 0:
    raise ValueError(f"distributed num_processes must be >= 1 (or 0 = detect), got {num}")
  if address and ":" not in address:
    raise ValueError(f"coordinator address {address!r} must be host:port (the port of process "
                     "0's coordinator service)")
  if num and pid >= num:
    raise ValueError(f"process_id {pid} must lie in [0, {num}) (num_processes={num})")
  kwargs: dict[str, Any] = {}
  if address:
    kwargs["coordinator_address"] = address
  if num:
    kwargs["num_processes"] = num
  if pid >= 0:
    kwargs["process_id"] = pid
  return kwargs


def initialize(cfg) -> None:
  """Starts `jax.distributed` as `cfg` (config.distributed) and the environment ask; see the
  module docstring. Must run before any other JAX call."""
  kwargs = resolve(cfg)
  if kwargs is None:
    return
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  if jax.process_index() != 0 and os.environ.get(ENV_LOG_ALL, "") in ("", "0"):
    logging.set_verbosity(logging.WARNING)


def is_primary() -> bool:
  """Process 0: the one that writes logs, reports, TensorBoard events and JSON."""
  return jax.process_index() == 0


def _to_bytes(value: Any) -> bytes:
  try:
    return json.dumps(value, sort_keys=True).encode("utf-8")
  except (TypeError, ValueError) as e:
    raise ValueError(f"value shared between processes must be JSON-serialisable: {e}") from None


def _padded(data: bytes, size: int) -> np.ndarray:
  buf = np.zeros(size, np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  return buf


def _bucket(n: int) -> int:
  # Power-of-two buffer sizes: the collectives compile once per size, not once per length.
  return max(64, 1 << (max(n, 1) - 1).bit_length())


def broadcast_json(value: Any) -> Any:
  """Process 0's `value` (JSON-serialisable) on every process; the others' values are ignored."""
  if jax.process_count() == 1:
    return json.loads(_to_bytes(value))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = _to_bytes(value) if is_primary() else b""
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = multihost_utils.broadcast_one_to_all(_padded(data, _bucket(n)))
  return json.loads(np.asarray(buf[:n], np.uint8).tobytes())


def gather_json(value: Any) -> list[Any]:
  """Every process's `value` (JSON-serialisable), in process order, on every process."""
  data = _to_bytes(value)
  if jax.process_count() == 1:
    return [json.loads(data)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  bufs = np.asarray(multihost_utils.process_allgather(_padded(data, _bucket(int(sizes.max())))))
  return [json.loads(bufs[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


class PrimaryFailedError(RuntimeError):
  """Raised on processes 1..N-1 when process 0 failed in a step they were waiting for."""


def run_on_primary(what: str, fn: Callable[[], Any]) -> Any:
  """Runs `fn()` on process 0 only and returns its (JSON-serialisable) result on every process.

  For work that must happen once (generating files into a shared folder, validating a dataset):
  the others wait, then get the same answer. If `fn` raises, process 0 re-raises it and every
  other process raises `PrimaryFailedError` with the same message, instead of waiting forever.
  """
  if jax.process_count() == 1:
    return fn()
  error: BaseException | None = None
  outcome = None
  if is_primary():
    try:
      outcome = {"value": fn()}
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
      outcome = {"error": f"{type(e).__name__}: {e}"}
  shared = broadcast_json(outcome)
  if error is not None:
    raise error
  if "error" in shared:
    raise PrimaryFailedError(f"process 0 failed while {what}: {shared['error']}")
  return shared["value"]


@contextlib.contextmanager
def primary_first(what: str) -> Iterator[None]:
  """Process 0 runs the block first; the others run it once process 0 has finished it.

  For code that writes a file on first use and reads it afterwards (e.g. a tokenizer built into
  the workdir): run concurrently, N processes would race on the same file.
  """
  if jax.process_count() == 1:
    yield
    return
  if is_primary():
    try:
      yield
    except BaseException as e:
      broadcast_json(f"{type(e).__name__}: {e}")
      raise
    broadcast_json("")
  else:
    failure = broadcast_json(None)
    if failure:
      raise PrimaryFailedError(f"process 0 failed while {what}: {failure}")
    yield
