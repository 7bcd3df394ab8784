"""Loading a trained model for inference, and a jitted clip -> class-probability predictor.

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
neither the training config nor the optimizer is rebuilt. An export records the model configs
but not the preprocessing: its frames are taken as the reference's ([0, 1] pixels, no mean/std
normalisation) unless its `extra` metadata says `normalize`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dfer_clip_jax import checkpointing
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.conversion import reference as reference_lib
from dfer_clip_jax.data import augment

# The trainer ranks its checkpoints by this metric (higher is better): the validation metric, or
# test WAR under the paper protocol.
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
  """
  kind: str
  path: pathlib.Path
  step: int | None
  given: str

  def describe(self) -> str:
    step = f" (step {self.step})" if self.step is not None else ""
    return f"{self.kind} {self.path}{step}"


def is_export(path: pathlib.Path) -> bool:
  return (path / reference_lib.EXPORT_CONFIG).is_file() and (
      path / reference_lib.EXPORT_WEIGHTS).is_file()


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
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path {p} does not exist")
  if p.is_file():
    raise FileNotFoundError(
        f"{p} is a file; give the folder holding it: a training workdir, a checkpoint folder, or "
        f"a model export ({reference_lib.EXPORT_WEIGHTS} + {reference_lib.EXPORT_CONFIG}). A "
        "reference .pth must first be converted with `python -m dfer_clip_jax.convert`")
  if is_export(p):
    return CheckpointRef(EXPORT, p, None, given)
  if (p / checkpointing.CONFIG).is_dir() and (p / checkpointing.STATE).is_dir():
    reason = checkpointing.verify_checkpoint(p)
    if reason is not None:
      raise ValueError(f"checkpoint {p} is unusable because {reason}")
    return CheckpointRef(CHECKPOINT, p, _step_of_folder(p), given)
  directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  which = str(which)
  if which == "latest":
    step = checkpointing.latest_valid_step(directory)
    if step is None:
      raise FileNotFoundError(
          f"{p} holds no usable checkpoint: expected a training workdir (with checkpoints/<step>/"
          f"), a checkpoint folder (with {checkpointing.STATE}/ and {checkpointing.CONFIG}/), or "
          f"a model export ({reference_lib.EXPORT_WEIGHTS} + {reference_lib.EXPORT_CONFIG})")
  elif which == "best":
    step = best_step(directory)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory} was saved with evaluation "
                              "metrics, so there is no best step; use --which=latest")
  elif which.isdigit():
    step = int(which)
  else:
    raise ValueError(f"which={which!r}: expected 'latest', 'best' or a step number")
  step_dir = directory / str(step)
  if not step_dir.is_dir():
    raise FileNotFoundError(f"no checkpoint step {step} in {directory}")
  reason = checkpointing.verify_checkpoint(step_dir)
  if reason is not None:
    raise ValueError(f"checkpoint {step_dir} is unusable because {reason}")
  return CheckpointRef(WORKDIR, step_dir, step, given)


def best_step(directory: str | os.PathLike, metric: str = BEST_METRIC) -> int | None:
  """The usable step with the highest `metric` in its saved metrics (the latest among ties).

  Reads the folders only: opening an Orbax `CheckpointManager` here could remove the temporary
  folder of a save that a running trainer is writing.
  """
  directory = pathlib.Path(directory)
  best: tuple[float, int] | None = None
  for step_dir in directory.iterdir() if directory.is_dir() else ():
    if not step_dir.name.isdigit() or not (step_dir / checkpointing.METRICS).is_dir():
      continue
    if checkpointing.verify_checkpoint(step_dir) is not None:
      continue
    try:
      metrics = ocp.JsonCheckpointHandler(filename=checkpointing.METRICS).restore(
          epath.Path(step_dir / checkpointing.METRICS))
    except Exception:  # pylint: disable=broad-exception-caught
      continue  # an unreadable metrics item only takes the step out of the ranking
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      key = (float(value), int(step_dir.name))
      best = key if best is None or key > best else best
  return None if best is None else best[1]


def _spec_of_export(path: pathlib.Path, dfer_cfg, clip_cfg) -> state_lib.ModelSpec:
  meta = json.loads((path / reference_lib.EXPORT_CONFIG).read_text(encoding="utf-8"))
  extra = meta.get("extra") or {}
  normalize = extra.get("normalize", False)
  if not isinstance(normalize, bool):
    raise ValueError(f"{path / reference_lib.EXPORT_CONFIG}: extra.normalize must be true or "
                     f"false, got {normalize!r}")
  return state_lib.ModelSpec(clip=clip_cfg, dfer=dfer_cfg, class_names=tuple(dfer_cfg.names),
                             image_size=clip_cfg.vision.image_size,
                             num_frames=dfer_cfg.num_frames, normalize=normalize)


def _restore_model_state(step_dir: pathlib.Path, abstract_state):
  """Reads only the `model` subtree of the checkpoint's state item onto one device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"model": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)}
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        step_dir / checkpointing.STATE,
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ValueError(f"cannot read the model weights of checkpoint {step_dir}: "
                     f"{type(e).__name__}: {str(e)[:500]} (does its saved model spec match "
                     "its weights?)") from e
  finally:
    checkpointer.close()
  return restored["model"]


def load_model_for_inference(path: str | os.PathLike | CheckpointRef,
                             which: str | int = "latest"
                             ) -> tuple[nnx.Module, state_lib.ModelSpec]:
  """Loads a model and its spec (class names, input size, frames, preprocessing) for inference.

  Args:
    path: a training workdir, a checkpoints folder, one checkpoint folder, a model export
      folder, or a `CheckpointRef` from `resolve_checkpoint`.
    which: for a workdir or checkpoints folder: "latest", "best" or a step number.

  Returns:
    (model, spec): the DFER-CLIP `nnx.Module` on the first local device, and its `ModelSpec`.
  """
  ref = path if isinstance(path, CheckpointRef) else resolve_checkpoint(path, which)
  if ref.kind == EXPORT:
    dfer_cfg, clip_cfg = _export_configs(ref.path)
    spec = _spec_of_export(ref.path, dfer_cfg, clip_cfg)
    model, _, _ = reference_lib.load_exported_model(ref.path)
    return model, spec
  saved = checkpointing.read_config(ref.path)
  if "model" not in saved:
    raise ValueError(f"checkpoint {ref.path} has no model spec in its config item (keys: "
                     f"{sorted(saved)}); it was not written by the dfer_clip_jax trainer")
  spec = state_lib.ModelSpec.from_dict(saved["model"])
  abstract_model = nnx.eval_shape(lambda: state_lib.model_from_spec(spec, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  model_state = _restore_model_state(ref.path, abstract_state)
  return nnx.merge(graphdef, model_state), spec


def _export_configs(path: pathlib.Path):
  meta = json.loads((path / reference_lib.EXPORT_CONFIG).read_text(encoding="utf-8"))
  if meta.get("format") != reference_lib.EXPORT_FORMAT:
    raise ValueError(f"{path / reference_lib.EXPORT_CONFIG}: format {meta.get('format')!r}, "
                     f"expected {reference_lib.EXPORT_FORMAT!r}")
  return (reference_lib.DFERCLIPConfig.from_dict(meta["dfer_clip"]),
          reference_lib.CLIPConfig.from_dict(meta["clip"]))


class Predictor:
  """Class probabilities of uint8 clips, jitted for one batch shape.

  Clips are padded to a multiple of `batch_size`, so every call runs the same compiled program;
  the class prompts' text features are computed once (they don't depend on the video).
  """

  def __init__(self, model: nnx.Module, spec: state_lib.ModelSpec, *, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.spec = spec
    self.batch_size = batch_size
    self.graphdef, self.state = nnx.split(model)
    normalize = spec.normalize

    def text_features(model_state):
      m = nnx.merge(self.graphdef, model_state)
      return None if m.prompt_learner is None else m.text_features()[0]

    def probs(model_state, video_uint8, text_feats):
      m = nnx.merge(self.graphdef, model_state)
      video = augment.to_model_input(video_uint8, normalize=normalize)
      logits, _ = m(video, train=False, text_features=text_feats)
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    self._probs = jax.jit(probs)
    self._text = jax.jit(text_features)(self.state)

  @property
  def clip_shape(self) -> tuple[int, int, int, int]:
    """(T, H, W, 3) of one clip."""
    s = self.spec
    return (s.num_frames, s.image_size, s.image_size, 3)

  def __call__(self, clips_uint8: np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) uint8 clips -> (N, C) float32 probabilities."""
    clips_uint8 = np.asarray(clips_uint8)
    if clips_uint8.dtype != np.uint8 or clips_uint8.shape[1:] != self.clip_shape:
      raise ValueError(f"expected uint8 clips of shape (N, {', '.join(map(str, self.clip_shape))})"
                       f", got {clips_uint8.dtype} {clips_uint8.shape}")
    n = clips_uint8.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      batch = clips_uint8[start:start + self.batch_size]
      pad = self.batch_size - batch.shape[0]
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
      out.append(np.asarray(self._probs(self.state, batch, self._text))[:self.batch_size - pad])
    if not out:
      return np.zeros((0, len(self.spec.class_names)), np.float32)
    return np.concatenate(out)


def model_description(spec: state_lib.ModelSpec) -> dict[str, Any]:
  """What a prediction file records about the model: classes, their texts, input and frames."""
  try:
    texts = spec.dfer.texts() if spec.dfer.head == "prompt" else None
  except (OSError, ValueError):
    # A user class-texts file of the training machine may be absent here; the prompts
    # themselves are model state, so prediction does not need it.
    texts = None
  return {"class_names": list(spec.class_names), "class_texts": texts,
          "image_size": spec.image_size, "num_frames": spec.num_frames,
          "normalize": spec.normalize, "head": spec.dfer.head, "text_type": spec.dfer.text_type}
