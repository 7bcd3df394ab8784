"""DFER-CLIP: CLIP image tower + temporal transformer vs. learnable-context class prompts.

The model as the reference computes it (SPEC section 1), with the paper's baselines (SPEC 5) as
config options:

  video (B, T, H, W, 3) -> CLIP image tower on B*T frames (b-major: row b*T + t) -> (B, T, D)
    -> temporal transformer ([cls, frames] + pos, pre-norm blocks, cls row) or the frame mean
    -> video features (B, D), L2-normalised
  C prompts [start, ctx_1..ctx_M, class text, end, pad] -> frozen CLIP text tower -> (C, D),
    L2-normalised
  logits = video @ text.T * 100  (a fixed scale, as the reference; CLIP's learned scale optional)

Kept from the reference: fixed logit scale 100, tanh-GELU in the temporal FFN, N(0, 1) init of the
temporal cls/pos embeddings, no final LayerNorm or projection after the temporal transformer,
class-specific context by default, the text tower frozen but run on the prompts every step.
Switchable: depth 0 (here: mean of the frame features; the reference's depth 0 is degenerate,
see `TemporalTransformer`), shared context, middle/front class position, text types and manual
templates, CLIP's learned logit scale, a linear classifier head instead of the prompts.

Parameter paths (dotted, as used by the optimizer's regex groups and the checkpoint importer):
  clip.visual.*, clip.text.*, clip.logit_scale      the CLIP towers (OpenAI names)
  temporal_net.{cls_token, pos_embedding, temporal_transformer.layers.{i}.{attn,ff}.*}
  prompt_learner.ctx                                the learnable context (a Param)
  prompt_learner.{token_prefix, token_suffix, name_lens}   constant buffers (`PromptBuffer`)
  head.{kernel, bias}                               linear-head baselines only
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.models import class_texts as class_texts_lib
from dfer_clip_jax.models.clip import CLIP, AttentionImpl, attention

TextType = Literal["class_name", "name_with_context", "descriptor", "template"]
Position = Literal["end", "middle", "front"]
Head = Literal["prompt", "linear"]
LogitScale = Literal["fixed", "clip"]

# The placeholder word whose token embeddings the learnable context replaces (one BPE token).
CONTEXT_PLACEHOLDER = "X"


@dataclasses.dataclass(frozen=True)
class DFERCLIPConfig:
  """Everything that shapes the DFER-CLIP model (the CLIP towers have their own `CLIPConfig`).

  Defaults are the paper's model: 8 class-specific context tokens at the end, class descriptors,
  temporal depth 1 (8 heads of 64, MLP 1024), 16 frames, logit scale fixed at 100.
  """
  num_classes: int = 7  # 7 (DFEW, FERV39k) or 11 (MAFW)
  class_names: tuple[str, ...] | None = None  # None: the first num_classes of the 11-class order
  num_frames: int = 16  # frames per clip (T); the temporal position embedding has T + 1 rows
  # Temporal model; depth 0 = mean of the frame features (the paper's "w/o TM").
  temporal_depth: int = 1
  temporal_heads: int = 8
  temporal_dim_head: int = 64
  temporal_mlp_dim: int = 1024
  temporal_dropout: float = 0.0  # the reference trains with 0
  # Classifier: "prompt" = cosine similarity to the class prompts' text features (DFER-CLIP,
  # CoOp, zero-shot, manual prompts); "linear" = a Linear layer on the raw video features.
  head: Head = "prompt"
  # Class texts of the prompts (see `class_texts.py`).
  text_type: TextType = "descriptor"
  template: str | None = None  # for text_type "template", e.g. "a photo of {}."
  class_texts_file: str | None = None  # user texts (JSON or one per line) instead of built-ins
  # Learnable context: n_ctx tokens (0 = manual prompts, nothing learnable in the text branch).
  n_ctx: int = 8
  class_specific: bool = True  # context (C, M, W) per class, else (M, W) shared by all classes
  position: Position = "end"  # where the class text sits relative to the context
  ctx_init_std: float = 0.02
  # Logits: "fixed" multiplies by fixed_logit_scale (reference: 100); "clip" by exp(CLIP's
  # learned logit_scale).
  logit_scale: LogitScale = "fixed"
  fixed_logit_scale: float = 100.0

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"DFERCLIPConfig: {msg}")
    if self.num_classes < 1:
      fail(f"num_classes must be positive, got {self.num_classes}")
    if self.class_names is not None:
      if isinstance(self.class_names, str) or len(self.class_names) != self.num_classes:
        fail(f"class_names must be a sequence of num_classes={self.num_classes} names, got "
             f"{self.class_names!r}")
      object.__setattr__(self, "class_names", tuple(self.class_names))
    if self.num_frames < 1:
      fail(f"num_frames must be positive, got {self.num_frames}")
    if self.temporal_depth < 0:
      fail(f"temporal_depth must be >= 0, got {self.temporal_depth}")
    if min(self.temporal_heads, self.temporal_dim_head, self.temporal_mlp_dim) < 1:
      fail("temporal_heads, temporal_dim_head and temporal_mlp_dim must be positive")
    if not 0.0 <= self.temporal_dropout < 1.0:
      fail(f"temporal_dropout must be in [0, 1), got {self.temporal_dropout}")
    for field, allowed in (("head", ("prompt", "linear")),
                           ("text_type", class_texts_lib.TEXT_TYPES),
                           ("position", ("end", "middle", "front")),
                           ("logit_scale", ("fixed", "clip"))):
      if getattr(self, field) not in allowed:
        fail(f"{field}={getattr(self, field)!r}, expected one of {allowed}")
    if self.n_ctx < 0:
      fail(f"n_ctx must be >= 0, got {self.n_ctx}")
    if (self.text_type == "template") != (self.template is not None):
      fail("template must be set exactly when text_type is 'template' (got text_type="
           f"{self.text_type!r}, template={self.template!r})")
    if self.template is not None and "{}" not in self.template:
      fail(f"template {self.template!r} has no '{{}}' for the class name")
    if self.class_texts_file is not None and self.text_type == "template":
      fail("class_texts_file and a template are exclusive: the file gives each class's text")

  @property
  def names(self) -> tuple[str, ...]:
    """The class names in label order."""
    if self.class_names is not None:
      return self.class_names
    return class_texts_lib.default_class_names(self.num_classes)

  def texts(self) -> list[str]:
    """Each class's prompt text (without the context placeholders)."""
    if self.class_texts_file is not None:
      return class_texts_lib.load_class_texts(self.class_texts_file, self.names)
    return class_texts_lib.class_texts(self.names, self.text_type, self.template)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d["class_names"] is not None:
      d["class_names"] = list(d["class_names"])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DFERCLIPConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"DFERCLIPConfig: unknown keys {unknown}; known keys: {sorted(known)}")
    d = dict(d)
    if d.get("class_names") is not None:
      d["class_names"] = tuple(d["class_names"])
    return cls(**d)

  def replace(self, **kw) -> "DFERCLIPConfig":
    return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------------------------
# Temporal transformer


def _torch_linear(fan_in: int, fan_out: int, *, use_bias: bool, dtype, rngs: nnx.Rngs
                  ) -> nnx.Linear:
  """nn.Linear with PyTorch's default init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(fan_in, fan_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=uniform, bias_init=uniform, rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                       rngs=rngs)


class TemporalAttention(nnx.Module):
  """Pre-norm self-attention: one bias-free Linear D -> 3*H*Dh (q, k, v, then heads), no mask,
  output Linear H*Dh -> D with bias.

  Reference names: `layers.{i}.0.fn.{norm, fn.to_qkv, fn.to_out.0}`.
  """

  def __init__(self, width: int, heads: int, dim_head: int, dropout: float, *, dtype,
               attention_impl: AttentionImpl, rngs: nnx.Rngs):
    self.heads, self.dim_head = heads, dim_head
    self.attention_impl = attention_impl
    self.norm = _layer_norm(width, rngs)
    self.to_qkv = _torch_linear(width, 3 * heads * dim_head, use_bias=False, dtype=dtype,
                                rngs=rngs)
    self.to_out = _torch_linear(heads * dim_head, width, use_bias=True, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    b, n, _ = x_BxNxD.shape
    qkv_BxNx3HDh = self.to_qkv(self.norm(x_BxNxD).astype(x_BxNxD.dtype))
    qkv_BxNx3xHxDh = qkv_BxNx3HDh.reshape(b, n, 3, self.heads, self.dim_head)
    q, k, v = (qkv_BxNx3xHxDh[:, :, i] for i in range(3))
    # Scale dim_head ** -0.5, softmax over keys: the reference's formula.
    out_BxNxHxDh = attention(q, k, v, causal=False, impl=self.attention_impl)
    out_BxNxD = self.to_out(out_BxNxHxDh.reshape(b, n, self.heads * self.dim_head))
    return self.dropout(out_BxNxD, deterministic=not train, rngs=rngs)


class TemporalFeedForward(nnx.Module):
  """Pre-norm MLP D -> mlp_dim -> D with the tanh-approximated GELU (reference: `layers.{i}.1.fn.
  {norm, fn.net.0, fn.net.3}`)."""

  def __init__(self, width: int, mlp_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.norm = _layer_norm(width, rngs)
    self.fc1 = _torch_linear(width, mlp_dim, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = _torch_linear(mlp_dim, width, use_bias=True, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h_BxNxF = jax.nn.gelu(self.fc1(self.norm(x_BxNxD).astype(x_BxNxD.dtype)), approximate=True)
    h_BxNxF = self.dropout(h_BxNxF, deterministic=not train, rngs=rngs)
    return self.dropout(self.fc2(h_BxNxF), deterministic=not train, rngs=rngs)


class TemporalBlock(nnx.Module):
  def __init__(self, width: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, *,
               dtype, attention_impl: AttentionImpl, rngs: nnx.Rngs):
    self.attn = TemporalAttention(width, heads, dim_head, dropout, dtype=dtype,
                                  attention_impl=attention_impl, rngs=rngs)
    self.ff = TemporalFeedForward(width, mlp_dim, dropout, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    x_BxNxD = x_BxNxD + self.attn(x_BxNxD, train=train, rngs=rngs)
    return x_BxNxD + self.ff(x_BxNxD, train=train, rngs=rngs)


class TemporalEncoder(nnx.Module):
  """`depth` pre-norm blocks (`layers.{i}`), no final LayerNorm."""

  def __init__(self, width: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
               dropout: float, *, dtype, attention_impl: AttentionImpl, rngs: nnx.Rngs):
    self.layers = nnx.List([
        TemporalBlock(width, heads, dim_head, mlp_dim, dropout, dtype=dtype,
                      attention_impl=attention_impl, rngs=rngs) for _ in range(depth)])

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    for layer in self.layers:
      x_BxNxD = layer(x_BxNxD, train=train, rngs=rngs)
    return x_BxNxD


class TemporalTransformer(nnx.Module):
  """Frame features (B, T, D) -> video feature (B, D), not normalised (SPEC 1.2).

  x = [cls, frames] + pos -> depth pre-norm blocks -> x[:, 0]. Depth must be >= 1: with depth 0
  the reference keeps only cls + pos[0], the same vector for every video, so its "w/o TM" results
  cannot come from it; `DFERCLIP` uses the frame mean for depth 0 instead and has no
  `temporal_net`.
  """

  def __init__(self, width: int, num_frames: int, depth: int, heads: int, dim_head: int,
               mlp_dim: int, dropout: float = 0.0, *, dtype=jnp.float32,
               attention_impl: AttentionImpl = "xla", rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f"TemporalTransformer needs depth >= 1, got {depth} (depth 0 is the "
                       "frame mean, handled by DFERCLIP)")
    self.width, self.num_frames, self.dtype = width, num_frames, dtype
    # Std 1.0, as the reference's torch.randn (not the 0.02 usual for ViTs).
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, width), jnp.float32))
    self.pos_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (1, num_frames + 1, width), jnp.float32))
    self.temporal_transformer = TemporalEncoder(width, depth, heads, dim_head, mlp_dim, dropout,
                                                dtype=dtype, attention_impl=attention_impl,
                                                rngs=rngs)

  def __call__(self, frames_BxTxD: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (video feature (B, D), all output tokens (B, T + 1, D))."""
    b, t, d = frames_BxTxD.shape
    if (t, d) != (self.num_frames, self.width):
      raise ValueError(f"temporal transformer expects (B, {self.num_frames}, {self.width}) frame "
                       f"features, got {frames_BxTxD.shape}")
    cls_Bx1xD = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x_BxNxD = jnp.concatenate([cls_Bx1xD, frames_BxTxD.astype(jnp.float32)], axis=1)
    x_BxNxD = (x_BxNxD + self.pos_embedding[...]).astype(self.dtype)
    tokens_BxNxD = self.temporal_transformer(x_BxNxD, train=train, rngs=rngs)
    return tokens_BxNxD[:, 0].astype(jnp.float32), tokens_BxNxD


# --------------------------------------------------------------------------------------------
# Prompt learner


class PromptBuffer(nnx.Variable):
  """A constant tensor of the prompt learner (precomputed token embeddings, class-text lengths):
  saved with the model, never trained, no optimizer state."""


@dataclasses.dataclass(frozen=True)
class PromptBuffers:
  """The prompt learner's constants: token embeddings of each class's prompt around the context.

  token_prefix (C, 1, W): the start token's embedding.
  token_suffix (C, L - 1 - M, W): embeddings of positions 1 + M .. L - 1 (class text, end token,
    padding).
  name_lens (C,): tokens of each class text (no start/end token); the end token sits at
    1 + M + name_lens in every position mode.
  """
  token_prefix: Any
  token_suffix: Any
  name_lens: Any

  @property
  def num_classes(self) -> int:
    return self.token_prefix.shape[0]

  @classmethod
  def zeros(cls, num_classes: int, n_ctx: int, context_length: int, width: int
            ) -> "PromptBuffers":
    """Placeholders of the right shapes, to build a model whose buffers are then restored."""
    return cls(np.zeros((num_classes, 1, width), np.float32),
               np.zeros((num_classes, context_length - 1 - n_ctx, width), np.float32),
               np.zeros((num_classes,), np.int32))


def prompt_token_ids(tokenizer, texts: Sequence[str], n_ctx: int, context_length: int = 77
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenizes `"X " * n_ctx + text` per class -> (ids (C, L), eot (C,), name_lens (C,)).

  Checks that the end token lands at 1 + n_ctx + name_len (each placeholder one token, the class
  text tokenized the same inside the prompt as alone).
  """
  prompts = [f"{CONTEXT_PLACEHOLDER} " * n_ctx + text for text in texts]
  ids_CxL, eot_C = tokenizer_lib.tokenize(tokenizer, prompts, context_length)
  name_lens_C = np.array([tokenizer_lib.count_tokens(tokenizer, t) for t in texts], np.int32)
  bad = np.nonzero(eot_C != 1 + n_ctx + name_lens_C)[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"prompt {i} ({prompts[i][:80]!r}) does not tokenize as start + {n_ctx} "
                     f"placeholders + {name_lens_C[i]} text tokens + end (end token at "
                     f"{eot_C[i]})")
  return ids_CxL, eot_C.astype(np.int32), name_lens_C


def build_prompt_buffers(tokenizer, texts: Sequence[str], n_ctx: int,
                         token_embedding_VxW: jax.Array | np.ndarray,
                         context_length: int = 77) -> PromptBuffers:
  """Embeds the prompts once with the frozen token embedding and splits prefix / suffix."""
  ids_CxL, _, name_lens_C = prompt_token_ids(tokenizer, texts, n_ctx, context_length)
  emb_CxLxW = np.asarray(token_embedding_VxW, np.float32)[ids_CxL]
  return PromptBuffers(emb_CxLxW[:, :1], emb_CxLxW[:, 1 + n_ctx:], name_lens_C)


def prompt_gather_index(position: str, n_ctx: int, name_lens_C: jax.Array, length: int
                        ) -> jax.Array:
  """Where each prompt row comes from, (C, L) indices into [prefix, ctx_1..M, suffix].

  end:    [start, ctx, text, end, pad]             (identity)
  front:  [start, text, ctx, end, pad]
  middle: [start, ctx[:M//2], text, ctx[M//2:], end, pad]
  The end token stays at 1 + M + name_len in every mode.
  """
  p_1xL = jnp.arange(length)[None, :]
  nl_Cx1 = jnp.asarray(name_lens_C, jnp.int32)[:, None]
  text_src = 1 + n_ctx  # where the class text starts in [prefix, ctx, suffix]
  if position == "end":
    return jnp.broadcast_to(p_1xL, (nl_Cx1.shape[0], length))
  lead = 0 if position == "front" else n_ctx // 2  # context tokens before the class text
  in_text = (p_1xL >= 1 + lead) & (p_1xL < 1 + lead + nl_Cx1)
  in_rest = (p_1xL >= 1 + lead + nl_Cx1) & (p_1xL < 1 + n_ctx + nl_Cx1)
  idx = jnp.where(in_text, text_src + (p_1xL - 1 - lead), p_1xL)
  idx = jnp.where(in_rest, 1 + lead + (p_1xL - 1 - lead - nl_Cx1), idx)
  return idx


class PromptLearner(nnx.Module):
  """Learnable context (CoOp-style) around fixed class-text token embeddings (SPEC 1.3).

  With n_ctx = 0 the prompts are the class texts' token embeddings (manual prompts).
  """

  def __init__(self, buffers: PromptBuffers, *, n_ctx: int, class_specific: bool,
               position: str, init_std: float = 0.02, rngs: nnx.Rngs):
    c, one, width = np.shape(buffers.token_prefix)
    suffix_shape = np.shape(buffers.token_suffix)
    if one != 1 or suffix_shape[0] != c or suffix_shape[2] != width or np.shape(
        buffers.name_lens) != (c,):
      raise ValueError(f"prompt buffers disagree: prefix {np.shape(buffers.token_prefix)}, "
                       f"suffix {suffix_shape}, name_lens {np.shape(buffers.name_lens)}; expected "
                       "(C, 1, W), (C, L - 1 - M, W), (C,)")
    self.num_classes, self.width, self.n_ctx = c, width, n_ctx
    self.context_length = 1 + n_ctx + suffix_shape[1]
    self.class_specific, self.position = class_specific, position
    if n_ctx:
      shape = (c, n_ctx, width) if class_specific else (n_ctx, width)
      self.ctx = nnx.Param(init_std * jax.random.normal(rngs.params(), shape, jnp.float32))
    else:
      self.ctx = None
    self.token_prefix = PromptBuffer(jnp.asarray(buffers.token_prefix, jnp.float32))
    self.token_suffix = PromptBuffer(jnp.asarray(buffers.token_suffix, jnp.float32))
    self.name_lens = PromptBuffer(jnp.asarray(buffers.name_lens, jnp.int32))

  @property
  def eot(self) -> jax.Array:
    """End-of-text row of each prompt, (C,)."""
    return 1 + self.n_ctx + self.name_lens[...]

  def __call__(self) -> jax.Array:
    """The assembled prompt embeddings (C, L, W)."""
    parts = [self.token_prefix[...]]
    if self.ctx is not None:
      ctx = self.ctx[...]
      if ctx.ndim == 2:  # shared context: broadcast to the classes before any splitting
        ctx = jnp.broadcast_to(ctx[None], (self.num_classes,) + ctx.shape)
      parts.append(ctx)
    parts.append(self.token_suffix[...])
    pool_CxLxW = jnp.concatenate(parts, axis=1)
    if self.position == "end" or self.n_ctx == 0:
      return pool_CxLxW
    idx_CxL = prompt_gather_index(self.position, self.n_ctx, self.name_lens[...],
                                  self.context_length)
    return jnp.take_along_axis(pool_CxLxW, idx_CxL[:, :, None], axis=1)


# --------------------------------------------------------------------------------------------
# The model


def _l2_normalize(x: jax.Array) -> jax.Array:
  # No epsilon, as the reference's x / x.norm(dim=-1, keepdim=True).
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class DFERCLIP(nnx.Module):
  """The DFER-CLIP video classifier and its baselines (see the module docstring)."""

  def __init__(self, config: DFERCLIPConfig, clip: CLIP, *,
               prompt_buffers: PromptBuffers | None = None, dtype=jnp.float32,
               attention_impl: AttentionImpl = "xla", rngs: nnx.Rngs):
    """Builds the temporal model and the prompt learner (or linear head) around `clip`.

    Args:
      config: the model config.
      clip: the CLIP towers (its image tower is trained, its text tower is not).
      prompt_buffers: the prompt learner's constants (`build_prompt_buffers`, or from a reference
        checkpoint); required for head "prompt", ignored for head "linear".
      dtype: compute dtype of the temporal transformer and the head.
      attention_impl: attention implementation of the temporal transformer.
      rngs: parameter initialisation.
    """
    self.config = config
    self.clip = clip
    width = clip.config.embed_dim
    self.width = width
    if config.temporal_depth > 0:
      self.temporal_net = TemporalTransformer(
          width, config.num_frames, config.temporal_depth, config.temporal_heads,
          config.temporal_dim_head, config.temporal_mlp_dim, config.temporal_dropout,
          dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    else:
      self.temporal_net = None
    prompt_learner, head = None, None  # each attribute is assigned once (NNX data vs static)
    if config.head == "prompt":
      if prompt_buffers is None:
        raise ValueError("head 'prompt' needs prompt_buffers (see build_prompt_buffers or "
                         "create_dfer_clip)")
      if prompt_buffers.num_classes != config.num_classes:
        raise ValueError(f"prompt buffers hold {prompt_buffers.num_classes} classes, config "
                         f"says {config.num_classes}")
      suffix_len = np.shape(prompt_buffers.token_suffix)[1]
      text_cfg = clip.config.text
      if 1 + config.n_ctx + suffix_len != text_cfg.context_length:
        raise ValueError(f"prompt suffix of {suffix_len} rows with n_ctx={config.n_ctx} does not "
                         f"fill the text context of {text_cfg.context_length}")
      prompt_learner = PromptLearner(prompt_buffers, n_ctx=config.n_ctx,
                                     class_specific=config.class_specific,
                                     position=config.position, init_std=config.ctx_init_std,
                                     rngs=rngs)
    else:
      head = _torch_linear(width, config.num_classes, use_bias=True, dtype=dtype, rngs=rngs)
    self.prompt_learner = prompt_learner
    self.head = head

  def text_features(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(text features (C, D) normalised, raw (C, D), prompts (C, L, W)) of the class prompts."""
    if self.prompt_learner is None:
      raise ValueError("a linear-head model has no text features")
    prompts_CxLxW = self.prompt_learner()
    raw_CxD = self.clip.encode_text_embeddings(prompts_CxLxW, self.prompt_learner.eot)
    raw_CxD = raw_CxD.astype(jnp.float32)
    return _l2_normalize(raw_CxD), raw_CxD, prompts_CxLxW

  def logit_scale(self) -> jax.Array:
    if self.config.logit_scale == "clip":
      return jnp.exp(self.clip.logit_scale[...])
    return jnp.asarray(self.config.fixed_logit_scale, jnp.float32)

  def __call__(self, video_BxTxHxWx3: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None = None, text_features: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Video clips -> (logits (B, C), aux).

    Args:
      video_BxTxHxWx3: float32 pixels, preprocessed as the CLIP tower expects (the reference:
        [0, 1], no mean/std normalisation).
      train: enables dropout (the reference's dropout is 0, so train and eval agree there).
      rngs: dropout randomness (`nnx.Rngs(dropout=key)`), needed when training with dropout > 0.
      text_features: precomputed normalised (C, D) text features (e.g. `text_features()[0]`
        once per evaluation: they don't depend on the video); computed when None.

    Returns:
      logits (B, C) and aux with frame_features (B, T, D) (raw CLIP image features),
      video_features (B, D) / video_features_raw, and for the prompt head text_features (C, D),
      plus text_features_raw and prompts (C, L, W) when computed here.
    """
    if video_BxTxHxWx3.ndim != 5 or video_BxTxHxWx3.shape[-1] != 3:
      raise ValueError(f"expected video (B, T, H, W, 3), got {video_BxTxHxWx3.shape}")
    b, t, h, w, _ = video_BxTxHxWx3.shape
    if t != self.config.num_frames:
      raise ValueError(f"expected {self.config.num_frames} frames per clip, got video "
                       f"{video_BxTxHxWx3.shape}")
    if train and self.config.temporal_dropout > 0 and rngs is None:
      raise ValueError("training with temporal_dropout > 0 needs rngs=nnx.Rngs(dropout=key)")
    d = self.width
    frames_NxHxWx3 = video_BxTxHxWx3.reshape(b * t, h, w, 3)  # b-major: row b*T + t
    frame_NxD = self.clip.encode_image(frames_NxHxWx3)
    assert frame_NxD.shape == (b * t, d), frame_NxD.shape
    frame_BxTxD = frame_NxD.reshape(b, t, d).astype(jnp.float32)
    aux: dict[str, jax.Array] = {"frame_features": frame_BxTxD}
    if self.temporal_net is not None:
      video_raw_BxD, _ = self.temporal_net(frame_BxTxD, train=train, rngs=rngs)
    else:
      video_raw_BxD = frame_BxTxD.mean(axis=1)
    assert video_raw_BxD.shape == (b, d), video_raw_BxD.shape
    video_BxD = _l2_normalize(video_raw_BxD)
    aux["video_features_raw"] = video_raw_BxD
    aux["video_features"] = video_BxD
    if self.head is not None:
      logits_BxC = self.head(video_raw_BxD).astype(jnp.float32)
    else:
      if text_features is None:
        text_features, aux["text_features_raw"], aux["prompts"] = self.text_features()
      assert text_features.shape == (self.config.num_classes, d), text_features.shape
      aux["text_features"] = text_features
      logits_BxC = video_BxD @ text_features.T * self.logit_scale()
    return logits_BxC, aux


def create_dfer_clip(config: DFERCLIPConfig, clip: CLIP, tokenizer=None, *,
                     texts: Sequence[str] | None = None, dtype=jnp.float32,
                     attention_impl: AttentionImpl = "xla", rngs: nnx.Rngs) -> DFERCLIP:
  """Builds a DFER-CLIP model on a (pretrained) CLIP, tokenizing the class prompts once.

  `texts` overrides the config's class texts (one per class); the tokenizer is needed for the
  prompt head only.
  """
  buffers = None
  if config.head == "prompt":
    if tokenizer is None:
      raise ValueError("head 'prompt' needs a tokenizer to build the class prompts")
    texts = list(texts) if texts is not None else config.texts()
    if len(texts) != config.num_classes:
      raise ValueError(f"got {len(texts)} class texts for {config.num_classes} classes")
    buffers = build_prompt_buffers(tokenizer, texts, config.n_ctx, clip.token_embedding,
                                   clip.config.text.context_length)
  return DFERCLIP(config, clip, prompt_buffers=buffers, dtype=dtype,
                  attention_impl=attention_impl, rngs=rngs)


# --------------------------------------------------------------------------------------------
# Trainable groups and baselines


def param_groups(config: DFERCLIPConfig, *, temporal_lr: float = 1e-2, image_lr: float = 1e-5,
                 prompt_lr: float = 1e-3, head_lr: float = 1e-3, train_image: bool = True
                 ) -> list[dict[str, Any]]:
  """Optimizer groups (regex over dotted parameter paths -> lr) for `optim.make_optimizer`.

  The reference: temporal 1e-2, image tower 1e-5, prompt context 1e-3; everything else (text
  tower, token embedding, CLIP logit scale) frozen. The first matching group wins; the last group
  freezes the rest.
  """
  groups = []
  if config.temporal_depth > 0:
    groups.append({"name": "temporal", "regex": r"temporal_net\..*", "lr": temporal_lr})
  if train_image:
    groups.append({"name": "image", "regex": r"clip\.visual\..*", "lr": image_lr})
  if config.head == "prompt" and config.n_ctx > 0:
    groups.append({"name": "prompt", "regex": r"prompt_learner\.ctx", "lr": prompt_lr})
  if config.head == "linear":
    groups.append({"name": "head", "regex": r"head\..*", "lr": head_lr})
  groups.append({"name": "frozen", "regex": r".*", "trainable": False})
  return groups


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A model config plus its optimizer groups; `trained` False means evaluate only."""
  config: DFERCLIPConfig
  groups: list[dict[str, Any]]
  trained: bool = True


BASELINES = ("dfer_clip", "zero_shot", "linear_probe", "finetune_linear",
             "finetune_linear_temporal", "coop", "manual_photo", "manual_expression")


def baseline(name: str, **overrides) -> Baseline:
  """The paper's model and baselines (SPEC 5) by name; `overrides` replace config fields.

  dfer_clip                 the paper's model (8 class-specific context tokens + descriptors,
                            temporal depth 1, fixed scale 100); trains image, temporal, context.
  zero_shot                 CLIP as is: frame mean, prompts "an expression of [class].", CLIP's
                            own learned logit scale (argmax is scale-free; the scale only matters
                            for probabilities and loss); nothing trained.
  linear_probe              frame mean of frozen CLIP image features -> Linear head; only the
                            head trains.
  finetune_linear           frame mean -> Linear head; head and image tower train.
  finetune_linear_temporal  temporal transformer -> Linear head; head, temporal, image train.
  coop                      CoOp: 8 context tokens shared by all classes + class names.
  manual_photo              "a photo of [class]." (Table 3), no learnable context.
  manual_expression         "an expression of [class]." (Table 3), no learnable context.
  The manual-prompt baselines keep the temporal model and train image + temporal.
  """
  fields: dict[str, Any]
  train_image, trained = True, True
  if name == "dfer_clip":
    fields = {}
  elif name == "zero_shot":
    fields = dict(temporal_depth=0, n_ctx=0, text_type="template",
                  template=class_texts_lib.MANUAL_TEMPLATES["expression"], logit_scale="clip")
    train_image, trained = False, False
  elif name == "linear_probe":
    fields = dict(head="linear", temporal_depth=0)
    train_image = False
  elif name == "finetune_linear":
    fields = dict(head="linear", temporal_depth=0)
  elif name == "finetune_linear_temporal":
    fields = dict(head="linear")
  elif name == "coop":
    fields = dict(class_specific=False, text_type="class_name")
  elif name in ("manual_photo", "manual_expression"):
    fields = dict(n_ctx=0, text_type="template",
                  template=class_texts_lib.MANUAL_TEMPLATES[name.split("_")[1]])
  else:
    raise ValueError(f"unknown baseline {name!r}: expected one of {BASELINES}")
  fields.update(overrides)
  config = DFERCLIPConfig(**fields)
  groups = param_groups(config, train_image=train_image)
  if not trained:
    groups = [{"name": "frozen", "regex": r".*", "trainable": False}]
  return Baseline(config, groups, trained)
