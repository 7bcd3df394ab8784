"""From a config to a model, its optimizer and their sharded state.

A run's *model spec* (a JSON dict saved with every checkpoint) says everything needed to rebuild
the model without the original CLIP checkpoint or tokenizer: the CLIP sizes (and input size), the
DFER-CLIP config (class names, frames, pixel preprocessing) and the compute settings. Prompt token embeddings are model state
(`PromptBuffer`s), so a restored model needs no tokenizer either.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from dfer_clip_jax import optim
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.conversion import hub
from dfer_clip_jax.conversion.clip_weights import load_clip
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib
from dfer_clip_jax.models import prompts as prompts_lib

SPEC_FORMAT = "dfer_clip_jax.model/2"


def model_config(config: ml_collections.ConfigDict, class_names) -> dfer_lib.DFERCLIPConfig:
  """The DFER-CLIP config of a run: the `model` section as is, plus the data's class names."""
  return dfer_lib.DFERCLIPConfig(class_names=tuple(class_names), **config.model.to_dict())


def dtype_of(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"clip.dtype={name!r}: expected float32 or bfloat16")
  return jnp.dtype(name)


@dataclasses.dataclass
class ModelSpec:
  """What a checkpoint needs to rebuild its model (saved as JSON): the CLIP towers' config, the
  DFER-CLIP config (the run's `model` section plus the class names) and how to compute (the
  run's `clip.dtype`, `clip.attention_impl`, `clip.remat`)."""

  clip: clip_lib.CLIPConfig
  model: dfer_lib.DFERCLIPConfig
  dtype: str = "float32"
  attention_impl: str = "xla"
  remat: str = "none"  # a speed/memory setting (`clip.remat_mode`); it does not change values

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.model.class_names

  @property
  def image_size(self) -> int:
    return self.clip.vision.image_size

  @property
  def num_frames(self) -> int:
    return self.model.num_frames

  def to_dict(self) -> dict[str, Any]:
    return {
      "format": SPEC_FORMAT,
      "clip": self.clip.to_dict(),
      "model": self.model.to_dict(),
      "dtype": self.dtype,
      "attention_impl": self.attention_impl,
      "remat": self.remat,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
    if d.get("format") != SPEC_FORMAT:
      raise ValueError(
        f"model spec format {d.get('format')!r} is not {SPEC_FORMAT!r}: the "
        "checkpoint was written by an older version of dfer_clip_jax, whose "
        "model spec this version does not read (retrain, or evaluate it with "
        "that version)"
      )
    return cls(
      clip=clip_lib.CLIPConfig.from_dict(d["clip"]),
      model=dfer_lib.DFERCLIPConfig.from_dict(d["model"]),
      dtype=d["dtype"],
      attention_impl=d["attention_impl"],
      remat=clip_lib.remat_mode(d["remat"]),
    )


def _tokenizer(config, workdir: pathlib.Path, texts: list[str], vocab_size: int):
  if config.clip.tokenizer:
    return tokenizer_lib.load_tokenizer(config.clip.tokenizer)
  ckpt = hub.resolve(config.clip.checkpoint) if config.clip.checkpoint else None
  if ckpt is not None and ckpt.is_dir() and (ckpt / "vocab.json").is_file():
    return tokenizer_lib.load_tokenizer(ckpt)
  if ckpt is not None:
    raise ValueError(
      f"{ckpt} carries no tokenizer (vocab.json + merges.txt): set "
      "clip.tokenizer to a Hugging Face CLIP folder"
    )
  # Random-init CLIP (demo, benchmarks): a small BPE vocabulary built offline from our texts.
  from dfer_clip_jax import demo_tokenizer  # pylint: disable=g-import-not-at-top

  folder = workdir / "tokenizer"
  if not (folder / "vocab.json").is_file():
    demo_tokenizer.build_demo_tokenizer(folder, texts, vocab_size=vocab_size)
  return tokenizer_lib.load_tokenizer(folder)


DEMO_VOCAB = 1000  # vocabulary of the offline demo tokenizer (and of random-init CLIPs)


def _random_clip(
  clip_cfg: clip_lib.CLIPConfig,
  key: jax.Array,
  *,
  dtype,
  attention_impl: str,
  remat: str,
  mesh,
  min_size: int,
) -> clip_lib.CLIP:
  """A randomly initialised CLIP created directly in its shardings (one jitted init: no
  host-side copy, no per-parameter eager dispatch)."""

  def make():
    return clip_lib.CLIP(
      clip_cfg, dtype=dtype, attention_impl=attention_impl, remat=remat, rngs=nnx.Rngs(params=key)
    )

  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abstract, mesh, min_size=min_size)
    # The prompt learner reads the (frozen) token-embedding table on the host once, which
    # needs it whole on every process: keep it replicated.
    shardings["text"]["token_embedding"]["embedding"] = jax.tree.map(
      lambda _: sharding_lib.replicated(mesh), shardings["text"]["token_embedding"]["embedding"]
    )
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def build_model(
  config, workdir: str | pathlib.Path, class_names, *, rngs: nnx.Rngs, mesh=None
) -> tuple[dfer_lib.DFERCLIP, ModelSpec, list[optim.ParamGroup]]:
  """Builds the model from the config: pretrained CLIP (or random init), prompts, heads.

  With a `mesh`, a random-init CLIP is created already sharded by the FSDP rule.
  Returns (model, spec, the optimizer groups present in the model); no group trainable means
  the model is evaluated only (zero-shot).
  """
  workdir = pathlib.Path(workdir)
  dtype = dtype_of(config.clip.dtype)
  dcfg = model_config(config, class_names)
  if config.clip.overlay and not config.clip.checkpoint:
    raise ValueError(
      f"clip.overlay={config.clip.overlay!r} replaces tensors of a checkpoint: set clip.checkpoint "
      "to the CLIP it goes over (FaRL: OpenAI's ViT-B-16.pt)"
    )
  if config.clip.checkpoint:
    clip, clip_cfg = load_clip(
      config.clip.checkpoint,
      overlay=config.clip.overlay or None,
      dtype=dtype,
      act=config.clip.act or None,
      image_size=config.clip.image_size,
      attention_impl=config.clip.attention_impl,
      remat=config.clip.remat,
    )
  else:
    clip_cfg = clip_lib.preset(config.clip.variant)
    clip_cfg = clip_cfg.replace(
      vision=dataclasses.replace(clip_cfg.vision, image_size=config.clip.image_size),
      text=dataclasses.replace(clip_cfg.text, vocab_size=DEMO_VOCAB),
    )
    clip = _random_clip(
      clip_cfg,
      rngs.params(),
      dtype=dtype,
      attention_impl=config.clip.attention_impl,
      remat=config.clip.remat,
      mesh=mesh,
      min_size=config.mesh.fsdp_min_size,
    )
  tok = None
  if dcfg.head == "prompt":
    texts = dcfg.texts()
    # The context's start text too: the demo tokenizer learns its words as whole tokens.
    extra = [dcfg.ctx_init] if dcfg.ctx_init else []
    tok = _tokenizer(config, workdir, texts + extra, clip_cfg.text.vocab_size)
  model = dfer_lib.create_dfer_clip(
    dcfg, clip, tok, dtype=dtype, attention_impl=config.clip.attention_impl, rngs=rngs
  )
  spec = ModelSpec(
    clip=clip_cfg,
    model=dcfg,
    dtype=config.clip.dtype,
    attention_impl=config.clip.attention_impl,
    remat=clip_lib.remat_mode(config.clip.remat),
  )
  groups = optim.present_groups(model, optim.groups_from_config(config.optim))
  return model, spec, groups


def model_from_spec(spec: ModelSpec, *, rngs: nnx.Rngs) -> dfer_lib.DFERCLIP:
  """A model of the spec's shapes (random CLIP, zero prompt buffers), to restore weights into.
  Call under `nnx.eval_shape` to get it abstract."""
  dtype = dtype_of(spec.dtype)
  clip = clip_lib.CLIP(
    spec.clip, dtype=dtype, attention_impl=spec.attention_impl, remat=spec.remat, rngs=rngs
  )
  buffers = None
  if spec.model.head == "prompt":
    buffers = prompts_lib.PromptBuffers.zeros(
      spec.model.num_classes, spec.model.n_ctx, spec.clip.text.context_length, spec.clip.text.width
    )
  return dfer_lib.DFERCLIP(
    spec.model,
    clip,
    prompt_buffers=buffers,
    dtype=dtype,
    attention_impl=spec.attention_impl,
    rngs=rngs,
  )


def make_schedule(config, steps_per_epoch: int):
  """Multiplier of the base learning rates at each step: epoch-wise multistep decay, times an
  optional linear warm-up from 1/warmup to 1 over the first `optim.warmup_epochs`.

  Both factors read the absolute step, so the milestones stay at their epochs whatever the
  warm-up (joining the two with `optax.join_schedules` would hand the decay `step - warmup`
  and move every milestone one warm-up later).
  """
  boundaries = {int(m) * steps_per_epoch: config.optim.gamma for m in config.optim.milestones}
  decay = optax.piecewise_constant_schedule(1.0, boundaries)
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  if warmup <= 0:
    return decay
  ramp = optax.linear_schedule(1.0 / warmup, 1.0, warmup)
  return lambda step: ramp(step) * decay(step)


def is_trained(groups) -> bool:
  """Whether any of the groups trains (else the model is evaluated only)."""
  return any(g.trainable for g in groups)


def build_optimizer(config, model, groups, steps_per_epoch: int) -> nnx.Optimizer:
  o = config.optim
  return optim.make_optimizer(
    model,
    groups,
    optimizer=o.name,
    momentum=o.momentum,
    weight_decay=o.weight_decay,
    schedule=make_schedule(config, steps_per_epoch),
    clip_grad_norm=o.clip_grad_norm or None,
  )


def shard_state(state, mesh, min_size: int):
  """Places a state pytree on the mesh by the FSDP rule (replicated when fsdp = 1)."""
  shardings = sharding_lib.state_shardings(state, mesh, min_size=min_size)
  return jax.device_put(state, shardings), shardings


def abstract_with_shardings(state_shapes, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings
  )


def log_parameter_counts(model, optimizer) -> dict[str, int]:
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, optimizer.wrt)))
  logging.info("parameters: %d total, %d trained", total, trained)
  return {"params_total": int(total), "params_trained": int(trained)}
