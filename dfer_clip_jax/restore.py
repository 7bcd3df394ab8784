"""Where a trained model is read from, and the one function that restores it: `load_model`.

Three checkpoint layouts are recognised (`resolve_checkpoint` tells which one a path holds):

* a training **workdir** (holding `checkpoints/`) or its `checkpoints/` folder: the step named
  by `which` ("latest" = the newest usable step, "best" = the step with the best selection
  metric, or a step number);
* one **checkpoint folder** (a step folder, or a folder written by
  `checkpointing.save_checkpoint_dir`): `which` is ignored;
* a **model export** (`model.safetensors` + `config.json`, e.g. a reference checkpoint
  converted by `python -m dfer_clip_jax.convert`).

Orbax checkpoints are self-describing: their config item holds the model spec (CLIP and
DFER-CLIP configs, class names, input size, preprocessing). Only the model is read from them:
the optimizer state that training checkpoints also hold is skipped (Orbax partial restore), so
neither the training config nor the optimizer is rebuilt. An export records the same model
configs (a converted reference checkpoint: [0, 1] pixels, no mean/std normalisation).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dfer_clip_jax import checkpointing
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.conversion import reference as reference_lib

# The metrics key under which the trainer stores each epoch's `metrics.selection_key` (the one
# rule that picks the best epoch; `checkpointing.rank` orders steps by it).
BEST_METRIC = "select"
WORKDIR = "workdir"
CHECKPOINT = "checkpoint"
EXPORT = "export"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where a model is read from.

  Attributes:
    kind: "checkpoint" (an Orbax checkpoint folder, possibly a workdir's step) or "export"
      (`model.safetensors` + `config.json`).
    path: the folder holding the weights (the step folder for a workdir).
    step: the training step, when known.
    given: the path as the user gave it.
    epoch: the epoch the step ended, when it was saved with evaluation metrics.
    which: what was asked for in a workdir ("latest", "best" or a step), else "".
  """

  kind: str
  path: pathlib.Path
  step: int | None
  given: str
  epoch: int | None = None
  which: str = ""

  def describe(self) -> str:
    """E.g. `workdir /runs/x/checkpoints/66 (step 66, epoch 2, the best by the selection rule)`."""
    notes = [f"step {self.step}"] if self.step is not None else []
    notes += [f"epoch {self.epoch}"] if self.epoch is not None else []
    if self.which == "best":
      notes.append("the best by the selection rule")
    return f"{self.kind} {self.path}" + (f" ({', '.join(notes)})" if notes else "")


def is_export(path: pathlib.Path) -> bool:
  return (path / reference_lib.EXPORT_CONFIG).is_file() and (
    path / reference_lib.EXPORT_WEIGHTS
  ).is_file()


def _step_of_folder(path: pathlib.Path) -> int | None:
  return int(path.name) if path.name.isdigit() else None


def resolve_checkpoint(path: str | os.PathLike, which: str | int = "latest") -> CheckpointRef:
  """Finds the folder to load from `path` (see the module docstring for the layouts).

  Raises:
    FileNotFoundError: `path` does not exist or holds none of the layouts, or the requested
      step is missing.
    ValueError: `which` is not "latest", "best" or a step number, or the step is unusable.
  """
  given = str(path)
  # Absolute from here on: Orbax refuses relative paths (`--workdir=runs/demo` must work).
  p = pathlib.Path(os.path.abspath(os.path.expanduser(path)))
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path {p} does not exist")
  if p.is_file():
    raise FileNotFoundError(
      f"{p} is a file; give the folder holding it: a training workdir, a checkpoint folder, or "
      f"a model export ({reference_lib.EXPORT_WEIGHTS} + {reference_lib.EXPORT_CONFIG}). A "
      "reference .pth must first be converted with `python -m dfer_clip_jax.convert`"
    )
  if is_export(p):
    return CheckpointRef(EXPORT, p, None, given)
  if (p / checkpointing.CONFIG).is_dir() and (p / checkpointing.STATE).is_dir():
    reason = checkpointing.verify_checkpoint(p)
    if reason is not None:
      raise ValueError(f"checkpoint {p} is unusable because {reason}")
    return CheckpointRef(CHECKPOINT, p, _step_of_folder(p), given, _epoch_of(p))
  directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  which = str(which)
  asked = which
  if which == "latest":
    step = _latest_step(directory)
    if step is None:
      raise FileNotFoundError(
        f"{p} holds no usable checkpoint: expected a training workdir (with checkpoints/<step>/"
        f"), a checkpoint folder (with {checkpointing.STATE}/ and {checkpointing.CONFIG}/), or "
        f"a model export ({reference_lib.EXPORT_WEIGHTS} + {reference_lib.EXPORT_CONFIG})"
      )
    which = str(step)
  elif which != "best" and not which.isdigit():
    raise ValueError(f"which={which!r}: expected 'latest', 'best' or a step number")
  path = checkpointing.step_dir(directory, which, metric=BEST_METRIC)
  return CheckpointRef(WORKDIR, path, int(path.name), given, _epoch_of(path), asked)


def _epoch_of(step_dir: pathlib.Path) -> int | None:
  epoch = (checkpointing.read_metrics(step_dir) or {}).get("epoch")
  return int(epoch) if isinstance(epoch, int) else None


def _latest_step(directory: pathlib.Path) -> int | None:
  """The newest usable step; in a multi-process run the newest that every process can use."""
  if jax.process_count() == 1:
    return checkpointing.latest_valid_step(directory)
  ckptr = checkpointing.Checkpointer(
    directory, keep_last=10**6, keep_best=True, best_metric=BEST_METRIC
  )
  try:
    return checkpointing.agreed_latest_step(ckptr)
  finally:
    ckptr.close()


class UnreadableWeightsError(ValueError):
  """A checkpoint's model weights could not be read (its cause says why)."""


def _restore_model_state(step_dir: pathlib.Path, abstract_state, shardings):
  """Reads only the `model` subtree of the checkpoint's state item onto `shardings`."""
  target = {
    "model": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
  }
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
      step_dir / checkpointing.STATE,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UnreadableWeightsError(
      f"cannot read the model weights of checkpoint {step_dir}: "
      f"{type(e).__name__}: {str(e)[:500]} (does its saved model spec match "
      "its weights?)"
    ) from e
  finally:
    checkpointer.close()
  return restored["model"]


def load_model(
  path: str | os.PathLike | CheckpointRef,
  which: str | int = "latest",
  *,
  mesh: jax.sharding.Mesh | None = None,
  min_size: int = 2**18,
) -> tuple[nnx.Module, state_lib.ModelSpec, CheckpointRef]:
  """Restores a model, and only the model, with its spec (classes, input size, frames,
  preprocessing); the one restore of evaluation, prediction and conversion.

  Args:
    path: a training workdir, a checkpoints folder, one checkpoint folder, a model export
      folder, or a `CheckpointRef` from `resolve_checkpoint`.
    which: for a workdir or checkpoints folder: "latest", "best" or a step number.
    mesh: shard the parameters over this mesh by the FSDP rule (`min_size`: parameters with
      fewer elements stay replicated); None = the first local device.

  Returns:
    (model, spec, ref): the DFER-CLIP `nnx.Module`, its `ModelSpec`, and where it was read.
  """
  ref = path if isinstance(path, CheckpointRef) else resolve_checkpoint(path, which)
  if ref.kind == EXPORT:
    model, dfer_cfg, clip_cfg = reference_lib.load_exported_model(ref.path)
    spec = state_lib.ModelSpec(clip=clip_cfg, model=dfer_cfg)
    if mesh is not None:
      graphdef, model_state = nnx.split(model)
      model_state, _ = state_lib.shard_state(model_state, mesh, min_size)
      model = nnx.merge(graphdef, model_state)
    return model, spec, ref
  if ref.kind == WORKDIR and ref.which == "latest":
    # Damage that only reading the weights shows falls back to the step before (nothing is
    # renamed: evaluation only reads); a step asked for by number is never swapped.
    directory = ref.path.parent
    step, (model, spec), _ = checkpointing.newest_readable(
      directory, lambda p: _load_checkpoint(p, mesh, min_size), newest=ref.step
    )
    if step != ref.step:
      path = directory / str(step)
      ref = dataclasses.replace(ref, path=path, step=step, epoch=_epoch_of(path))
    return model, spec, ref
  return (*_load_checkpoint(ref.path, mesh, min_size), ref)


def _load_checkpoint(
  path: pathlib.Path, mesh, min_size: int
) -> tuple[nnx.Module, state_lib.ModelSpec]:
  saved = checkpointing.read_config(path)
  if "model" not in saved:
    raise ValueError(
      f"checkpoint {path} has no model spec in its config item (keys: "
      f"{sorted(saved)}); it was not written by the dfer_clip_jax trainer"
    )
  spec = state_lib.ModelSpec.from_dict(saved["model"])
  abstract_model = nnx.eval_shape(lambda: state_lib.model_from_spec(spec, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state)
  else:
    shardings = sharding_lib.state_shardings(abstract_state, mesh, min_size=min_size)
  model_state = _restore_model_state(path, abstract_state, shardings)
  return nnx.merge(graphdef, model_state), spec
