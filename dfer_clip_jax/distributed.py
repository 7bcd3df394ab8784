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

The helpers (`broadcast_json`, `gather_json`, `run_on_primary`, `run_on_every_process`,
`primary_first`, `barrier`) are collective: every process must call them in the same order. In a single
process they cost nothing. They wait on the coordination service of `jax.distributed` (its
key-value store), never on a device collective: host-side work (process 0 generating a dataset,
another process slow to read a bucket) can take as long as `config.distributed.wait_timeout_s`
(default an hour), whereas a collective's set-up gives up after 30 s. A waiting process logs
what it waits for every minute (DFER_WAIT_LOG_EVERY_S changes the period), and an error in the
guarded work reaches every process at once, with its message.

Test-only hook: DFER_TEST_PRIMARY_DELAY=SECONDS[:TEXT] makes process 0 sleep that long before
guarded work whose description contains TEXT (all guarded work without it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from absl import logging

ENV_ADDRESS = "DFER_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DFER_NUM_PROCESSES"
ENV_PROCESS_ID = "DFER_PROCESS_ID"
ENV_LOG_ALL = "DFER_LOG_ALL_PROCESSES"
ENV_WAIT_LOG_EVERY = "DFER_WAIT_LOG_EVERY_S"
ENV_TEST_PRIMARY_DELAY = "DFER_TEST_PRIMARY_DELAY"

# How long a process waits for the others' host-side work; `initialize` sets it from the config.
_wait_timeout_s = 3600.0
# Every process calls the helpers in the same order, so the n-th call uses the same keys on all.
_calls = itertools.count()


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
        "know each other"
      )
    return None
  if num < 0:
    raise ValueError(f"distributed num_processes must be >= 1 (or 0 = detect), got {num}")
  if address and ":" not in address:
    raise ValueError(
      f"coordinator address {address!r} must be host:port (the port of process "
      "0's coordinator service)"
    )
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
  global _wait_timeout_s
  if cfg.wait_timeout_s <= 0:
    raise ValueError(f"distributed.wait_timeout_s must be positive, got {cfg.wait_timeout_s}")
  _wait_timeout_s = float(cfg.wait_timeout_s)
  kwargs = resolve(cfg)
  if kwargs is None:
    return
  jax.distributed.initialize(**kwargs)
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  if jax.process_index() != 0 and os.environ.get(ENV_LOG_ALL, "") in ("", "0"):
    logging.set_verbosity(logging.WARNING)


def is_primary() -> bool:
  """Process 0: the one that writes logs, reports, TensorBoard events and JSON."""
  return jax.process_index() == 0


class ProcessFailedError(RuntimeError):
  """Raised on the other processes when one failed in a step they were waiting for."""


class PrimaryFailedError(ProcessFailedError):
  """Raised on processes 1..N-1 when process 0 failed in a step they were waiting for."""


def _client():
  # jax has no public API for the coordination service's key-value store.
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError(
      f"{jax.process_count()} processes but no jax.distributed client: start "
      "them with dfer_clip_jax.distributed.initialize"
    )
  return client


def _run(what: str, fn: Callable[[], Any]) -> tuple[str, BaseException | None]:
  """`fn()`'s outcome as JSON (`what` and {"value": ...} or {"error": "Type: message"}) and
  its error."""
  try:
    value = fn()
    try:
      return json.dumps({"what": what, "value": value}, sort_keys=True), None
    except (TypeError, ValueError) as e:
      raise ValueError(f"value shared between processes must be JSON-serialisable: {e}") from None
  except BaseException as e:  # pylint: disable=broad-exception-caught
    return _failure(what, e), e


def _failure(what: str, e: BaseException) -> str:
  return json.dumps({"what": what, "error": f"{type(e).__name__}: {e}"})


def _post(key: str, outcome: str) -> None:
  _client().key_value_set(key, outcome)


def _fetch(key: str, what: str, whom: str) -> dict[str, Any]:
  """The outcome `whom` posted under `key`, waiting for it up to `_wait_timeout_s` and saying so
  every DFER_WAIT_LOG_EVERY_S (60) seconds; raises if `whom` failed."""
  client = _client()
  every = float(os.environ.get(ENV_WAIT_LOG_EVERY, "") or 60)
  start = time.monotonic()
  while True:
    waited = time.monotonic() - start
    left = _wait_timeout_s - waited
    if left <= 0:
      raise TimeoutError(
        f"process {jax.process_index()} waited {waited:.0f} s for {whom} ({what}) and gave "
        f"up: raise --config.distributed.wait_timeout_s (now {_wait_timeout_s:.0f}) if that "
        "work takes longer"
      )
    try:
      got = json.loads(client.blocking_key_value_get(key, max(1, int(min(left, every) * 1e3))))
      break
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise
    logging.warning(
      "process %d: waiting for %s (%s) for %.0f s so far; giving up after %.0f s "
      "(distributed.wait_timeout_s)",
      jax.process_index(),
      whom,
      what,
      time.monotonic() - start,
      _wait_timeout_s,
    )
  if got["what"] != what:
    raise RuntimeError(
      f"{whom} was {got['what']} while process {jax.process_index()} was "
      f"{what}: every process must call the helpers of "
      "dfer_clip_jax.distributed in the same order"
    )
  if "error" in got:
    raise (PrimaryFailedError if whom == "process 0" else ProcessFailedError)(
      f"{whom} failed while {what}: {got['error']}"
    )
  return got


def _test_delay(what: str) -> None:
  """The test-only hook of the module docstring (process 0 only)."""
  raw = os.environ.get(ENV_TEST_PRIMARY_DELAY, "")
  if not raw:
    return
  seconds, _, text = raw.partition(":")
  if text in what:
    logging.warning("%s: process 0 sleeps %s s before %s", ENV_TEST_PRIMARY_DELAY, seconds, what)
    time.sleep(float(seconds))


def run_on_primary(what: str, fn: Callable[[], Any]) -> Any:
  """Runs `fn()` on process 0 only and returns its (JSON-serialisable) result on every process.

  For work that must happen once (generating files into a shared folder): the others wait, then
  get the same answer. If `fn` raises, process 0 re-raises it and every other process raises
  `PrimaryFailedError` with the same message at once.
  """
  if jax.process_count() == 1:
    return fn()
  key = f"dfer_clip_jax/{next(_calls)}/primary"
  if not is_primary():
    return _fetch(key, what, "process 0")["value"]
  _test_delay(what)
  outcome, error = _run(what, fn)
  _post(key, outcome)
  if error is not None:
    raise error
  return json.loads(outcome)["value"]


def _others(key: str, what: str, start: int = 0) -> list[Any]:
  """The values posted under `key/<p>` by processes `start`.. other than this one (None for
  this one)."""
  me = jax.process_index()
  return [
    None if p == me else _fetch(f"{key}/{p}", what, f"process {p}")["value"]
    for p in range(start, jax.process_count())
  ]


def run_on_every_process(what: str, fn: Callable[[], Any]) -> list[Any]:
  """Runs `fn()` on every process; returns every process's (JSON-serialisable) result, in
  process order, on every process.

  For work that the processes share (each validates its own part of a dataset). If `fn` raises
  anywhere, that process re-raises it and the others raise `ProcessFailedError` with its message
  as soon as they come to that process's result.
  """
  if jax.process_count() == 1:
    return [fn()]
  key = f"dfer_clip_jax/{next(_calls)}/every"
  me = jax.process_index()
  outcome, error = _run(what, fn)
  _post(f"{key}/{me}", outcome)
  if error is not None:
    raise error
  values = _others(key, what)
  values[me] = json.loads(outcome)["value"]
  return values


def broadcast_json(value: Any, what: str = "sharing a value") -> Any:
  """Process 0's `value` (JSON-serialisable) on every process; the others' values are ignored."""
  if jax.process_count() == 1:
    return json.loads(json.dumps(value))
  return run_on_primary(what, lambda: value)


def gather_json(value: Any, what: str = "gathering a value") -> list[Any]:
  """Every process's `value` (JSON-serialisable), in process order, on every process."""
  if jax.process_count() == 1:
    return [json.loads(json.dumps(value))]
  return run_on_every_process(what, lambda: value)


def barrier(what: str) -> None:
  """Returns once every process has reached it, e.g. before a device collective that would
  otherwise wait (and time out after 30 s) for a process still busy with host-side work."""
  gather_json(None, what)


@contextlib.contextmanager
def primary_first(what: str) -> Iterator[None]:
  """Process 0 runs the block first; the others run it once process 0 has finished it; then
  every process waits until all have finished it.

  For code that writes a file on first use and reads it afterwards (e.g. a tokenizer built into
  the workdir): run concurrently, N processes would race on the same file. The final wait keeps
  the processes together for the device collectives that follow. A failure in the block reaches
  every process with its message.
  """
  if jax.process_count() == 1:
    yield
    return
  key = f"dfer_clip_jax/{next(_calls)}/first"
  me = jax.process_index()
  if is_primary():
    _test_delay(what)
  else:
    _fetch(f"{key}/0", what, "process 0")
  try:
    yield
  except BaseException as e:
    _post(f"{key}/{me}", _failure(what, e))
    raise
  _post(f"{key}/{me}", json.dumps({"what": what, "value": None}))
  _others(key, what, start=1)
