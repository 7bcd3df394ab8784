"""From a config to a model, its optimizer and their sharded state.

A run's *model spec* (a JSON dict saved with every checkpoint) says everything needed to rebuild
the model without the original CLIP checkpoint or tokenizer: the CLIP sizes, the DFER-CLIP
config, class names, input size and preprocessing. Prompt token embeddings are model state
(`PromptBuffer`s), so a restored model needs no tokenizer either.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dfer_clip_jax import optim
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.conversion.clip_weights import load_clip
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib

SPEC_FORMAT = "dfer_clip_jax.model/1"
# Config baseline names -> the model library's names.
BASELINE_NAMES = {"zeroshot": "zero_shot", "linear_probe": "linear_probe",
                  "finetune": "finetune_linear", "finetune_tm": "finetune_linear_temporal",
                  "coop": "coop"}


def dfer_config(config: ml_collections.ConfigDict, class_names) -> tuple[dfer_lib.DFERCLIPConfig,
                                                                        list[dict], bool]:
  """The DFER-CLIP model config, its optimizer groups and whether it trains at all."""
  m = config.model
  common = dict(num_classes=len(class_names), class_names=tuple(class_names),
                num_frames=config.data.num_frames,
                class_texts_file=m.class_texts_file or None)
  lrs = dict(temporal_lr=config.optim.lr_temporal, image_lr=config.optim.lr_image,
             prompt_lr=config.optim.lr_prompt, head_lr=config.optim.lr_head)
  if m.baseline:
    if m.baseline not in BASELINE_NAMES:
      raise ValueError(f"model.baseline={m.baseline!r}: expected one of {sorted(BASELINE_NAMES)}")
    b = dfer_lib.baseline(BASELINE_NAMES[m.baseline], **common)
    train_image = any(g["name"] == "image" for g in b.groups)
    return b.config, dfer_lib.param_groups(b.config, train_image=train_image, **lrs), b.trained
  cfg = dfer_lib.DFERCLIPConfig(
      **common, text_type=m.text_type, template=m.template or None, n_ctx=m.n_ctx,
      class_specific=m.class_specific, position=m.position,
      temporal_depth=m.temporal_depth, temporal_heads=m.temporal_heads,
      temporal_dim_head=m.temporal_dim_head, temporal_mlp_dim=m.temporal_mlp_dim,
      temporal_dropout=m.temporal_dropout, logit_scale=m.logit_scale,
      fixed_logit_scale=m.fixed_logit_scale)
  return cfg, dfer_lib.param_groups(cfg, **lrs), True


def dtype_of(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"clip.dtype={name!r}: expected float32 or bfloat16")
  return jnp.dtype(name)


@dataclasses.dataclass
class ModelSpec:
  """What a checkpoint needs to describe its model (saved as JSON)."""
  clip: clip_lib.CLIPConfig
  dfer: dfer_lib.DFERCLIPConfig
  class_names: tuple[str, ...]
  image_size: int
  num_frames: int
  normalize: bool
  dtype: str = "float32"
  attention_impl: str = "xla"
  remat: str = "none"  # a speed/memory setting (`clip.remat_mode`); it does not change values

  def to_dict(self) -> dict[str, Any]:
    return {"format": SPEC_FORMAT, "clip": self.clip.to_dict(), "dfer": self.dfer.to_dict(),
            "class_names": list(self.class_names), "image_size": self.image_size,
            "num_frames": self.num_frames, "normalize": self.normalize, "dtype": self.dtype,
            "attention_impl": self.attention_impl, "remat": self.remat}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
    if d.get("format") != SPEC_FORMAT:
      raise ValueError(f"unknown model spec format {d.get('format')!r}, expected {SPEC_FORMAT}")
    return cls(clip=clip_lib.CLIPConfig.from_dict(d["clip"]),
               dfer=dfer_lib.DFERCLIPConfig.from_dict(d["dfer"]),
               class_names=tuple(d["class_names"]), image_size=d["image_size"],
               num_frames=d["num_frames"], normalize=d["normalize"], dtype=d["dtype"],
               attention_impl=d.get("attention_impl", "xla"), remat=clip_lib.remat_mode(d.get("remat", "none")))


def _tokenizer(config, workdir: pathlib.Path, texts: list[str], vocab_size: int):
  if config.clip.tokenizer:
    return tokenizer_lib.load_tokenizer(config.clip.tokenizer)
  ckpt = pathlib.Path(config.clip.checkpoint) if config.clip.checkpoint else None
  if ckpt is not None and ckpt.is_dir() and (ckpt / "vocab.json").is_file():
    return tokenizer_lib.load_tokenizer(ckpt)
  if ckpt is not None:
    raise ValueError(f"{ckpt} carries no tokenizer (vocab.json + merges.txt): set "
                     "clip.tokenizer to a Hugging Face CLIP folder")
  # Random-init CLIP (demo, benchmarks): a small BPE vocabulary built offline from our texts.
  from dfer_clip_jax import demo_tokenizer  # pylint: disable=g-import-not-at-top
  folder = workdir / "tokenizer"
  if not (folder / "vocab.json").is_file():
    demo_tokenizer.build_demo_tokenizer(folder, texts, vocab_size=vocab_size)
  return tokenizer_lib.load_tokenizer(folder)


DEMO_VOCAB = 1000  # vocabulary of the offline demo tokenizer (and of random-init CLIPs)


def _random_clip(clip_cfg: clip_lib.CLIPConfig, key: jax.Array, *, dtype, attention_impl: str,
                 remat: str, mesh, min_size: int) -> clip_lib.CLIP:
  """A randomly initialised CLIP created directly in its shardings (one jitted init: no
  host-side copy, no per-parameter eager dispatch)."""
  def make():
    return clip_lib.CLIP(clip_cfg, dtype=dtype, attention_impl=attention_impl, remat=remat,
                         rngs=nnx.Rngs(params=key))

  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abstract, mesh, min_size=min_size)
    # The prompt learner reads the (frozen) token-embedding table on the host once, which
    # needs it whole on every process: keep it replicated.
    shardings["text"]["token_embedding"]["embedding"] = jax.tree.map(
        lambda _: sharding_lib.replicated(mesh),
        shardings["text"]["token_embedding"]["embedding"])
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def build_model(config, workdir: str | pathlib.Path, class_names, *, rngs: nnx.Rngs,
                mesh=None) -> tuple[dfer_lib.DFERCLIP, ModelSpec, list[dict], bool]:
  """Builds the model from the config: pretrained CLIP (or random init), prompts, heads.

  With a `mesh`, a random-init CLIP is created already sharded by the FSDP rule.
  Returns (model, spec, optimizer groups, trained).
  """
  workdir = pathlib.Path(workdir)
  dtype = dtype_of(config.clip.dtype)
  dcfg, groups, trained = dfer_config(config, class_names)
  if config.clip.checkpoint:
    clip, clip_cfg = load_clip(config.clip.checkpoint, dtype=dtype, act=config.clip.act or None,
                               image_size=config.clip.image_size,
                               attention_impl=config.clip.attention_impl, remat=config.clip.remat)
  else:
    clip_cfg = clip_lib.preset(config.clip.variant)
    clip_cfg = clip_cfg.replace(
        vision=dataclasses.replace(clip_cfg.vision, image_size=config.clip.image_size),
        text=dataclasses.replace(clip_cfg.text, vocab_size=DEMO_VOCAB))
    clip = _random_clip(clip_cfg, rngs.params(), dtype=dtype,
                        attention_impl=config.clip.attention_impl, remat=config.clip.remat,
                        mesh=mesh, min_size=config.mesh.fsdp_min_size)
  tok = None
  if dcfg.head == "prompt":
    texts = dcfg.texts()
    tok = _tokenizer(config, workdir, texts, clip_cfg.text.vocab_size)
  model = dfer_lib.create_dfer_clip(dcfg, clip, tok, dtype=dtype,
                                    attention_impl=config.clip.attention_impl, rngs=rngs)
  spec = ModelSpec(clip=clip_cfg, dfer=dcfg, class_names=tuple(class_names),
                   image_size=config.clip.image_size, num_frames=config.data.num_frames,
                   normalize=config.data.normalize, dtype=config.clip.dtype,
                   attention_impl=config.clip.attention_impl,
                   remat=clip_lib.remat_mode(config.clip.remat))
  return model, spec, groups, trained


def model_from_spec(spec: ModelSpec, *, rngs: nnx.Rngs) -> dfer_lib.DFERCLIP:
  """A model of the spec's shapes (random CLIP, zero prompt buffers), to restore weights into.
  Call under `nnx.eval_shape` to get it abstract."""
  dtype = dtype_of(spec.dtype)
  clip = clip_lib.CLIP(spec.clip, dtype=dtype, attention_impl=spec.attention_impl,
                       remat=spec.remat, rngs=rngs)
  buffers = None
  if spec.dfer.head == "prompt":
    buffers = dfer_lib.PromptBuffers.zeros(spec.dfer.num_classes, spec.dfer.n_ctx,
                                           spec.clip.text.context_length, spec.clip.text.width)
  return dfer_lib.DFERCLIP(spec.dfer, clip, prompt_buffers=buffers, dtype=dtype,
                           attention_impl=spec.attention_impl, rngs=rngs)


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


def build_optimizer(config, model, groups, steps_per_epoch: int) -> nnx.Optimizer:
  o = config.optim
  return optim.make_optimizer(model, groups, optimizer=o.name, momentum=o.momentum,
                              weight_decay=o.weight_decay,
                              schedule=make_schedule(config, steps_per_epoch),
                              clip_grad_norm=o.clip_grad_norm or None)


def shard_state(state, mesh, min_size: int):
  """Places a state pytree on the mesh by the FSDP rule (replicated when fsdp = 1)."""
  shardings = sharding_lib.state_shardings(state, mesh, min_size=min_size)
  return jax.device_put(state, shardings), shardings


def abstract_with_shardings(state_shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_shapes, shardings)


def log_parameter_counts(model, optimizer) -> dict[str, int]:
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, optimizer.wrt)))
  logging.info("parameters: %d total, %d trained", total, trained)
  return {"params_total": int(total), "params_trained": int(trained)}
