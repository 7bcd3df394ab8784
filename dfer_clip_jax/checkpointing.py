"""Orbax checkpoints: train state + data iterator state + config, last K plus the best.

Layout of `directory` (Orbax's `CheckpointManager`, one folder per step)::

  <step>/state/               the train state pytree (params, optimizer state, counters), OCDBT
  <step>/data_state/          JSON: the data iterator state, so a resumed run sees the same data
  <step>/config/              JSON: the run's config (read back by `read_config`)
  <step>/metrics/             JSON: the evaluation metrics given to `save` (when given)
  <step>/commit_success.txt   Orbax's commit marker, written when the step is complete
  <step>/dfer_integrity.json  ours: every file's size, written once the save has finished

Retention is Orbax's: `AnyPreservationPolicy([LatestN(keep_last), BestN(n=1)])` keeps the last
`keep_last` steps plus the single best step by `best_metric`, however old; steps saved without
metrics (mid-epoch saves) are never "best" and go once K newer steps exist. Retention and
`best_step` rank steps with one function (`rank`): the metric (a number, or a list of numbers
compared in order), ties going to the earlier step.

A step is *usable* when it has its commit marker, readable Orbax metadata, a `state/` and a
`config/` item, and (when the integrity record exists) every recorded file with its recorded
size. `restore('latest')` takes the newest usable step that also reads back; newer broken steps
are reported with `logging.warning` and renamed to `<step>.corrupt` so that the resumed run can
save those steps again. Only evidence of corruption (a missing or truncated file, a failed
integrity record, unparsable JSON, a storage layer reporting lost data) makes a step broken; any
other failure to open a checkpoint (a bad argument, permissions, an unreachable mount) raises
`CheckpointAccessError` naming the cause, and nothing is renamed.

Multi-process runs: construct the `Checkpointer` and call `save`, `wait`, `restore` and `close`
on *every* process, with the same arguments (Orbax synchronises them and each process writes its
own shards of the state). Only the primary process (index 0) writes JSON (Orbax's JSON items and
our integrity record) and renames broken steps. The directory must be shared by all processes
(a local or network POSIX file system; the integrity record uses `os` file calls).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dfer_clip_jax import distributed

T = TypeVar("T")

STATE = "state"
DATA_STATE = "data_state"
CONFIG = "config"
METRICS = "metrics"  # Orbax's own item name for the metrics given to `CheckpointManager.save`.
COMMIT_FILE = "commit_success.txt"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
INTEGRITY_FILE = "dfer_integrity.json"
CORRUPT_SUFFIX = ".corrupt"
_STEP_NAME = re.compile(r"0|[1-9]\d*")  # Orbax's default step folder names.
_TMP_MARKER = ".orbax-checkpoint-tmp"


class _MidEpochSaveFilter:
  """Drops Orbax's warning for a save without metrics. Mid-epoch saves carry none by design (no
  evaluation ran; `BestN(keep_checkpoints_without_metrics=False)` leaves them to `LatestN`), and
  the warning would otherwise be printed at every one of them."""

  def filter(self, record) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.get_absl_logger().addFilter(_MidEpochSaveFilter())


class CheckpointAccessError(RuntimeError):
  """A checkpoint could not be opened for a reason that is no evidence of corruption (a bad
  argument, permissions, an unreachable mount): the run stops instead of skipping the step."""


# Words of the errors that a damaged checkpoint raises (Python's, JSON's and tensorstore's).
_CORRUPTION_SIGNS = (
  "data_loss",
  "not_found",
  "no such file",
  "truncat",
  "corrupt",
  "unexpected end",
  "out_of_range",
  "expecting value",
  "unterminated",
  "checksum",
  "decompress",  # compressed chunks that no longer decode (bytes overwritten in place)
)
_ACCESS_SIGNS = ("permission_denied", "permission denied", "unavailable", "unauthenticated")


def is_corruption(e: BaseException) -> bool:
  """Whether an error opening a checkpoint is evidence that its files are damaged.

  The whole chain of causes counts: Orbax wraps tensorstore's error (the one that says what
  is wrong) in a generic exception."""
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__
  if any(_is_access_error(x) for x in chain):
    return False
  return any(_is_damage(x) for x in chain)


def _is_access_error(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}".lower()
  return isinstance(e, PermissionError) or any(sign in text for sign in _ACCESS_SIGNS)


def _is_damage(e: BaseException) -> bool:
  if isinstance(e, (FileNotFoundError, json.JSONDecodeError, EOFError, UnicodeDecodeError)):
    return True
  text = f"{type(e).__name__}: {e}".lower()
  return any(sign in text for sign in _CORRUPTION_SIGNS)


def _access_error(path: pathlib.Path, what: str, e: BaseException) -> CheckpointAccessError:
  return CheckpointAccessError(
    f"cannot open checkpoint {path}: {what} failed with {_brief(e)}; this is not a sign of a "
    "damaged checkpoint, so it is neither skipped nor renamed: fix the cause and rerun"
  )


def rank(metrics: Any, metric: str, mode: str = "max") -> tuple[float, ...] | None:
  """The sort key of a step's saved metrics, higher is better: `metrics[metric]` (a number, or
  a list of numbers compared in order; negated for `mode` "min"), or None without a finite
  value. The one ranking of retention and `best_step`."""
  value = metrics.get(metric) if isinstance(metrics, Mapping) else None
  values = value if isinstance(value, (list, tuple)) else [value]
  if not values or not all(
    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
  ):
    return None
  sign = 1.0 if mode == "max" else -1.0
  return tuple(sign * float(v) for v in values)


def _is_primary() -> bool:
  return jax.process_index() == 0


def _check_json(name: str, value: Any) -> None:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"checkpoint item {name!r} must be JSON-serialisable: {e}") from None


def _brief(e: Exception) -> str:
  """`Type: message`, cut short: tensorstore errors carry kilobytes of spec."""
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= 300 else text[:300] + " ..."


def _step_dirs(directory: pathlib.Path) -> list[int]:
  """Steps with a folder in `directory`, ascending (whether or not they are usable)."""
  if not directory.is_dir():
    return []
  return sorted(
    int(p.name) for p in directory.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)
  )


def verify_checkpoint(step_dir: str | os.PathLike) -> str | None:
  """Why the checkpoint folder `step_dir` cannot be used, or None when it looks complete.

  Checks structure and metadata, and every file's size against the integrity record when there
  is one (it is missing when the run stopped between the commit and the record, or when the
  folder was written by other code); it does not read the arrays.
  Raises:
    CheckpointAccessError: opening a file failed for a reason that is no evidence of damage.
  """
  path = pathlib.Path(os.path.abspath(os.path.expanduser(step_dir)))
  if not path.is_dir():
    return "it is not a directory"
  if not (path / COMMIT_FILE).is_file():
    return f"it has no {COMMIT_FILE} commit marker: the save did not finish"
  try:
    json.loads((path / STEP_METADATA_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    if not is_corruption(e):
      raise _access_error(path, f"reading {STEP_METADATA_FILE}", e) from e
    return f"its {STEP_METADATA_FILE} is missing or unreadable ({e})"
  for item in (STATE, CONFIG):
    if not (path / item).is_dir():
      return f"it has no {item}/ item"
  record = path / INTEGRITY_FILE
  if record.exists():
    try:
      files = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as e:
      if isinstance(e, OSError) and not is_corruption(e):
        raise _access_error(path, f"reading {INTEGRITY_FILE}", e) from e
      return f"its {INTEGRITY_FILE} is unreadable ({e})"
    for rel, size in files.items():
      f = path / rel
      if not f.is_file():
        return f"{rel} is missing"
      actual = f.stat().st_size
      if actual != size:
        return f"{rel} has {actual} bytes but {size} were written (truncated or overwritten)"
  try:
    ocp.StandardCheckpointHandler().metadata(epath.Path(path / STATE))
  except Exception as e:  # pylint: disable=broad-exception-caught
    if not is_corruption(e):
      raise _access_error(path, f"reading the metadata of {STATE}/", e) from e
    return f"the metadata of {STATE}/ is unreadable ({_brief(e)})"
  for item in (CONFIG, DATA_STATE):
    if (path / item).is_dir():
      try:
        ocp.JsonCheckpointHandler().restore(epath.Path(path / item))
      except Exception as e:  # pylint: disable=broad-exception-caught
        if not is_corruption(e):
          raise _access_error(path, f"reading its {item}/ JSON", e) from e
        return f"its {item}/ JSON is unreadable ({_brief(e)})"
  return None


def latest_valid_step(directory: str | os.PathLike) -> int | None:
  """Newest step in `directory` that `verify_checkpoint` accepts; warns about each newer one."""
  directory = pathlib.Path(directory)
  for step in reversed(_step_dirs(directory)):
    reason = verify_checkpoint(directory / str(step))
    if reason is None:
      return step
    logging.warning(
      "checkpoint %s is unusable because %s; trying the previous one", directory / str(step), reason
    )
  return None


def newest_readable(
  directory: str | os.PathLike, read: Callable[[pathlib.Path], T], *, newest: int | None = None
) -> tuple[int, T, list[int]]:
  """(step, read(its folder), newer steps found broken) for the newest step of `directory`
  (at most `newest`) that `verify_checkpoint` accepts and `read` reads.

  The one fall-back of "latest" (the trainer's resume, evaluation): the integrity record can
  miss damage that shows only when the arrays are read (it is absent when a run stopped
  between a save and its record), so a read failing with signs of damage (`is_corruption`)
  marks the step broken and the previous one is tried; any other error propagates.
  Raises:
    FileNotFoundError: `directory` holds no step folder.
    ValueError: every step is broken (the warnings say why).
  """
  directory = pathlib.Path(directory)
  steps = [s for s in _step_dirs(directory) if newest is None or s <= newest]
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {directory}")
  broken: list[int] = []
  for step in reversed(steps):
    path = directory / str(step)
    reason = verify_checkpoint(path)
    if reason is None:
      try:
        result = read(path)
      except Exception as e:  # pylint: disable=broad-exception-caught
        if not is_corruption(e):
          raise
        reason = f"reading it failed ({_brief(e)})"
      else:
        if broken:
          logging.warning(
            "checkpoints %s are unusable; using step %d",
            ", ".join(str(directory / str(b)) for b in broken),
            step,
          )
        return step, result, broken
    logging.warning("checkpoint %s is unusable because %s; trying the previous one", path, reason)
    broken.append(step)
  raise ValueError(
    f"no usable checkpoint in {directory}: all of steps {steps} are broken (see the warnings above)"
  )


def read_metrics(step_dir: str | os.PathLike) -> dict | None:
  """The evaluation metrics saved with a step, or None when it has none (or they are unreadable:
  that only takes the step out of the ranking)."""
  path = pathlib.Path(os.path.abspath(step_dir)) / METRICS
  if not path.is_dir():
    return None
  try:
    metrics = ocp.JsonCheckpointHandler(filename=METRICS).restore(epath.Path(path))
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  return dict(metrics) if isinstance(metrics, Mapping) else None


def best_step(directory: str | os.PathLike, metric: str, mode: str = "max") -> int | None:
  """The usable step ranked first by `rank` of its saved metrics (ties: the earlier step), or
  None when no step has the metric.

  Reads the folders only: opening an Orbax `CheckpointManager` here could remove the temporary
  folder of a save that a running trainer is writing.
  """
  directory = pathlib.Path(os.path.abspath(directory))
  best: tuple[tuple[float, ...], int] | None = None
  for step in _step_dirs(directory):
    step_dir = directory / str(step)
    if not (step_dir / METRICS).is_dir() or verify_checkpoint(step_dir) is not None:
      continue
    key = rank(read_metrics(step_dir), metric, mode)
    if key is not None and (best is None or (key, -step) > best):
      best = (key, -step)
  return None if best is None else -best[1]


def step_dir(
  directory: str | os.PathLike, which: str | int | os.PathLike, *, metric: str, mode: str = "max"
) -> pathlib.Path:
  """The usable checkpoint folder that `which` names in `directory`: "latest", "best" (by
  `metric`, see `best_step`), a step (int or digit string), or the path of a checkpoint folder.

  Raises:
    FileNotFoundError: no such step or folder (or no step at all, or none with the metric).
    ValueError: the folder is unusable (`verify_checkpoint` says why).
  """
  directory = pathlib.Path(os.path.abspath(os.path.expanduser(directory)))
  if isinstance(which, str) and which == "latest":
    step = latest_valid_step(directory)
    if step is None:
      raise FileNotFoundError(f"no usable checkpoint in {directory}")
    path = directory / str(step)
  elif isinstance(which, str) and which == "best":
    step = best_step(directory, metric, mode)
    if step is None:
      raise FileNotFoundError(
        f"no checkpoint in {directory} was saved with evaluation metrics "
        f"({metric!r}): there is no best step"
      )
    path = directory / str(step)
  elif isinstance(which, int) or (isinstance(which, str) and _STEP_NAME.fullmatch(which)):
    path = directory / str(int(which))
    if not path.is_dir():
      raise FileNotFoundError(
        f"no checkpoint step {int(which)} in {directory}; steps there: {_step_dirs(directory)}"
      )
  else:
    path = pathlib.Path(os.path.abspath(os.path.expanduser(which)))
    if not path.is_dir():
      raise FileNotFoundError(f"checkpoint folder {path} does not exist")
  reason = verify_checkpoint(path)
  if reason is not None:
    raise ValueError(f"checkpoint {path} is unusable because {reason}")
  return path


def write_integrity_record(step_dir: str | os.PathLike) -> None:
  """Records the size of every file of a finished checkpoint (primary process only)."""
  if not _is_primary():
    return
  path = pathlib.Path(step_dir)
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      f = pathlib.Path(root) / name
      rel = f.relative_to(path).as_posix()
      if rel != INTEGRITY_FILE and not rel.startswith(INTEGRITY_FILE):
        files[rel] = f.stat().st_size
  tmp = path / (INTEGRITY_FILE + ".tmp")
  tmp.write_text(
    json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=1), encoding="utf-8"
  )
  os.replace(tmp, path / INTEGRITY_FILE)


def _step_of(path: pathlib.Path, checkpointer: ocp.Checkpointer) -> int | None:
  custom = checkpointer.metadata(path).custom_metadata or {}
  if "step" in custom:
    return int(custom["step"])
  return int(path.name) if _STEP_NAME.fullmatch(path.name) else None


def _restore_dir(
  path: pathlib.Path, abstract_state: Any
) -> tuple[int | None, Any, dict | None, dict | None, dict | None]:
  """Reads one checkpoint folder; the state lands on `abstract_state`'s shardings."""
  path = pathlib.Path(os.path.abspath(path))
  args = {STATE: ocp.args.StandardRestore(abstract_state)}
  handlers = {STATE: ocp.StandardCheckpointHandler()}
  for item in (DATA_STATE, CONFIG, METRICS):
    if (path / item).is_dir():
      args[item] = ocp.args.JsonRestore()
      # Orbax's manager writes the metrics under their own file name; naming every item's
      # handler restores the metrics with the rest (an unnamed item only gets a warning).
      handlers[item] = ocp.JsonCheckpointHandler(
        **({"filename": METRICS} if item == METRICS else {})
      )
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))
  try:
    restored = checkpointer.restore(path, args=ocp.args.Composite(**args))
    step = _step_of(path, checkpointer)
  finally:
    checkpointer.close()
  metrics = dict(restored[METRICS]) if METRICS in args else None
  data_state = restored[DATA_STATE] if DATA_STATE in args else None
  config = restored[CONFIG] if CONFIG in args else None
  return step, restored[STATE], data_state, config, metrics


def save_checkpoint_dir(
  path: str | os.PathLike,
  *,
  state: Any,
  config: Mapping[str, Any],
  step: int = 0,
  data_state: Mapping[str, Any] | None = None,
) -> None:
  """Writes one standalone checkpoint folder (e.g. from a weight-conversion tool), synchronously.

  The folder has the same layout as a managed step, so `Checkpointer.restore(path, ...)` and
  `read_config(path)` read it. Every process must call it (see the module docstring).
  """
  path = pathlib.Path(path).absolute()
  _check_json(CONFIG, config)
  args = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(dict(config))}
  if data_state is not None:
    _check_json(DATA_STATE, data_state)
    args[DATA_STATE] = ocp.args.JsonSave(dict(data_state))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    checkpointer.save(path, args=ocp.args.Composite(**args), custom_metadata={"step": int(step)})
  finally:
    checkpointer.close()
  write_integrity_record(path)


def read_config(workdir_or_ckpt: str | os.PathLike) -> dict[str, Any]:
  """The config JSON saved with a checkpoint, without reading any array.

  Accepts a checkpoint folder (a step, or one written by `save_checkpoint_dir`), a checkpoints
  directory, or a workdir holding `checkpoints/`; for the latter two the latest usable step's
  config is read.
  """
  path = pathlib.Path(os.path.abspath(os.path.expanduser(workdir_or_ckpt)))
  if (path / CONFIG).is_dir():
    step_dir = path
  else:
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    step = latest_valid_step(directory)
    if step is None:
      raise FileNotFoundError(
        f"no usable checkpoint in {directory} (looked for step folders holding {CONFIG}/)"
      )
    step_dir = directory / str(step)
  try:
    return dict(ocp.JsonCheckpointHandler().restore(epath.Path(step_dir / CONFIG)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f"cannot read the config of checkpoint {step_dir}: {e}") from e


class Checkpointer:
  """Asynchronous Orbax checkpoints of one run: keeps the last K plus the best by a metric."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep_last: int = 3,
    keep_best: bool = True,
    best_metric: str = "uar",
    best_mode: str = "max",
    async_save: bool = True,
    save_interval_steps: int = 1,
  ):
    """Opens (creates) `directory`.

    Args:
      directory: the checkpoints folder (e.g. `workdir/checkpoints`).
      keep_last: how many of the newest steps to keep (>= 1).
      keep_best: also keep the step with the best `best_metric`, however old.
      best_metric: key of the `metrics` dict given to `save` that ranks steps: a number, or a
        list of numbers compared in order (`rank`); ties go to the earlier step.
      best_mode: "max" or "min": whether a higher or a lower metric is better.
      async_save: write in a background thread (`save` returns once the arrays are copied to
        host memory, so the caller may donate / overwrite the state right after).
      save_interval_steps: `save` without `force` only writes steps that are multiples of it.
    """
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = pathlib.Path(os.path.abspath(os.path.expanduser(directory)))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.keep_best = keep_best
    if self.directory.is_dir():
      for p in sorted(self.directory.iterdir()):
        if _TMP_MARKER in p.name:
          logging.warning("removing %s: a partial save from an interrupted run", p)
    policies: list[Any] = [checkpoint_managers.LatestN(n=keep_last)]
    if keep_best:
      policies.append(
        checkpoint_managers.BestN(
          get_metric_fn=self._metric_value,  # higher is better, whatever best_mode is
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      # Orbax's default policy also saves the first step whatever its number; we don't.
      save_decision_policy=checkpoint_managers.AnySavePolicy(
        [
          checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
          checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
      ),
      # `best_fn` makes Orbax store the metrics and answer `best_step`; retention is the policy.
      best_fn=self._metric_value,
      best_mode="max",
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(STATE, DATA_STATE, CONFIG)
    )
    self._unrecorded: list[int] = []  # saved steps whose integrity record is not written yet

  def _metric_value(self, metrics: Mapping[str, Any]) -> tuple[float, ...]:
    # Orbax sorts ascending and keeps the last: the same order as `best_step` (rank, then the
    # earlier step), which is why `save` stores the step with the metrics.
    key = rank(metrics, self.best_metric, self.best_mode)
    # Steps written by other code may lack the metric: rank them last.
    return (-math.inf,) if key is None else (*key, -float(metrics.get("step", 0)))

  def save(
    self,
    step: int,
    *,
    state: Any,
    data_state: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving `step`; returns whether a save was started.

    Without `force`, only steps that are multiples of `save_interval_steps` are saved. A step
    that already exists is not saved again (returns False; pass `metrics` on the first save of a
    step if it should compete for best). `metrics`, when given, must hold a finite
    `best_metric` (a number or a list of numbers); it is stored with the step (plus its
    `step`) and returned by `restore`.

    Args:
      step: the global step (>= 0).
      state: pytree of jax.Arrays (any sharding) and numpy / Python scalars.
      data_state: JSON-serialisable data iterator state.
      config: JSON-serialisable config.
      metrics: JSON-serialisable evaluation metrics, or None (e.g. a mid-epoch save).
      force: save even if `step` is not a multiple of `save_interval_steps`.
    """
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"step must be a non-negative int, got {step!r}")
    _check_json(DATA_STATE, data_state)
    _check_json(CONFIG, config)
    if metrics is not None:
      _check_json(METRICS, metrics)
      if rank(metrics, self.best_metric) is None:
        raise ValueError(
          f"metrics must hold a finite number under {self.best_metric!r} (the best_metric; or "
          f"a list of finite numbers), got {metrics.get(self.best_metric)!r}"
        )
      metrics = {**metrics, "step": step}
    # Orbax waits here for the previous save anyway; waiting first lets us record it.
    self._finish_pending()
    if step in self._manager.all_steps():
      logging.warning(
        "checkpoint step %d already exists in %s: not saving it again", step, self.directory
      )
      return False
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          DATA_STATE: ocp.args.JsonSave(dict(data_state)),
          CONFIG: ocp.args.JsonSave(dict(config)),
        }
      ),
      metrics=metrics,
      force=force,
      custom_metadata={"step": step},
    )
    if saved:
      self._unrecorded.append(step)
    return saved

  def _finish_pending(self) -> None:
    self._manager.wait_until_finished()
    for step in self._unrecorded:
      step_dir = self.directory / str(step)
      if (step_dir / COMMIT_FILE).is_file():  # else: already removed by retention
        write_integrity_record(step_dir)
    self._unrecorded.clear()

  def wait(self) -> None:
    """Blocks until pending saves (and old-step deletions) have finished."""
    self._finish_pending()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._finish_pending()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """Steps Orbax lists in the directory (usable or not), ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric`; None when no step was saved with metrics."""
    self.wait()
    return best_step(self.directory, self.best_metric, self.best_mode)

  def latest_valid_step(self) -> int | None:
    """Newest usable step (see `verify_checkpoint`) after waiting for pending saves; each newer,
    unusable step is reported with `logging.warning` naming its folder and the reason."""
    self.wait()
    return latest_valid_step(self.directory)

  def restore(
    self, which: str | int | os.PathLike = "latest", *, abstract_state: Any
  ) -> tuple[int | None, Any, dict | None, dict | None, dict | None]:
    """Restores a checkpoint onto `abstract_state`'s shardings (any device count).

    Args:
      which: "latest" (newest usable step that reads back; broken newer steps are reported and
        renamed to `<step>.corrupt`), "best", a step (int or digit string), or the path of a
        checkpoint folder (e.g. written by `save_checkpoint_dir`, or a step copied elsewhere).
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding`, the structure that was
        saved (e.g. `jax.eval_shape` of the state init, with the target shardings).

    Returns:
      (step, state, data_state, config, metrics); step is None for a folder without a recorded
      step, data_state / config / metrics are None when the checkpoint has none.
    """
    self.wait()
    if isinstance(which, str) and which == "latest":
      return self._restore_latest(abstract_state)
    path = step_dir(self.directory, which, metric=self.best_metric, mode=self.best_mode)
    return _restore_dir(path.absolute(), abstract_state)

  def _restore_latest(self, abstract_state: Any):
    def read(path: pathlib.Path):
      try:
        return _restore_dir(path, abstract_state)
      except Exception as e:  # pylint: disable=broad-exception-caught
        if is_corruption(e):
          raise  # The step is broken: newest_readable tries the previous one.
        raise _access_error(path, "reading it", e) from e

    _, result, broken = newest_readable(self.directory, read)
    self._set_aside(broken)
    return result

  def _set_aside(self, steps: list[int]) -> None:
    """Renames broken steps newer than the restored one, so they can be saved again."""

    def rename() -> None:
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
        k = 1
        while dst.exists():
          dst = self.directory / f"{step}{CORRUPT_SUFFIX}{k}"
          k += 1
        if src.exists():
          src.rename(dst)
          logging.warning("renamed the broken checkpoint %s to %s", src, dst)

    # Every process calls this (even with nothing to rename): others must not list the steps
    # before the primary has moved them.
    distributed.run_on_primary("setting broken checkpoints aside", rename)
    self._manager.reload()


def agreed_latest_step(ckptr: Checkpointer) -> int | None:
  """The newest step that *every* process finds usable; newer broken steps are set aside.

  Collective (multi-process runs). Each process checks the steps process 0 lists
  (`verify_checkpoint`: commit marker, metadata, file sizes against the integrity
  record) and the newest step accepted by all is taken. A choice made per process could differ
  (a file system that shows one host a truncated file) and the processes would then restore
  different steps, or block in Orbax's restore barrier; so does a step that passes the checks
  but fails to read on one process, which is why the checks run first, on every process.
  """
  ckptr.wait()
  steps = distributed.broadcast_json(ckptr.all_steps() if distributed.is_primary() else None)
  reasons = [verify_checkpoint(ckptr.directory / str(s)) for s in steps]
  verdicts = distributed.gather_json(reasons)  # [process][step] -> None or why unusable
  chosen, broken = None, []
  for i in reversed(range(len(steps))):
    why = [(p, v[i]) for p, v in enumerate(verdicts) if v[i] is not None]
    if not why:
      chosen = steps[i]
      break
    if distributed.is_primary():
      logging.warning(
        "checkpoint %s is unusable (%s); trying the previous one",
        ckptr.directory / str(steps[i]),
        "; ".join(f"process {p}: {r}" for p, r in why),
      )
    broken.append(steps[i])
  if broken and chosen is not None:
    # So that the resumed run can save those steps again (every process must call it).
    ckptr._set_aside(broken)  # pylint: disable=protected-access
  return chosen
