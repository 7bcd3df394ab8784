"""CLIP image and text towers in Flax NNX, named after OpenAI's checkpoint layout.

Module and parameter names follow OpenAI's `clip/model.py` (`visual.conv1`, `visual.transformer.
resblocks.{i}.attn.in_proj`, `ln_final`, ...) so that converting a checkpoint is renaming plus
transposes (`dfer_clip_jax/conversion/clip_weights.py`). Hugging Face checkpoints are converted into
the same layout (q/k/v fused into `in_proj`).

Shapes: N images, K texts, L context length, P patches (+1 class token), W tower width,
E joint embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
AttentionImpl = Literal["auto", "xla", "cudnn", "plain"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "plain")
Remat = Literal["none", "block", "dots"]
REMAT_MODES = ("none", "block", "dots")


def remat_mode(remat: bool | str) -> str:
  """The image tower's rematerialisation mode: `none` stores every block's activations for the
  backward pass; `block` stores only each block's input and recomputes the rest (least memory);
  `dots` stores the outputs of the matrix products and recomputes only the cheap elementwise
  work between them (LayerNorms, activations, softmax), trading some of `block`'s saving for
  less recompute. Booleans are accepted as in earlier configs (True = block)."""
  if isinstance(remat, bool):
    return "block" if remat else "none"
  text = str(remat).lower()
  if text in ("true", "false"):
    return "block" if text == "true" else "none"
  if text not in REMAT_MODES:
    raise ValueError(f"unknown remat mode {remat!r}: expected one of {REMAT_MODES}")
  return text


# What each remat mode lets the backward pass keep (None: only the block's input).
_REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Sizes of the ViT image tower."""

  width: int = 768  # token width
  layers: int = 12  # residual attention blocks
  heads: int = 12  # attention heads (OpenAI rule: width // 64)
  mlp_dim: int = 3072  # hidden width of each block's MLP (OpenAI: 4 * width)
  patch_size: int = 32  # square patch side in pixels
  image_size: int = 224  # square input side in pixels
  act: Activation = "quick_gelu"  # MLP activation (HF `hidden_act`)
  eps: float = 1e-5  # LayerNorm epsilon

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Sizes of the causal text tower."""

  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  context_length: int = 77  # positions (CLIP pads every prompt to 77 tokens)
  vocab_size: int = 49408
  act: Activation = "quick_gelu"
  eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A whole CLIP model: both towers and the joint embedding width."""

  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  embed_dim: int = 512  # width of the joint (projected) embedding space
  logit_scale_init: float = math.log(1 / 0.07)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
    d = dict(d)
    vision = CLIPVisionConfig(**d.pop("vision", {}))
    text = CLIPTextConfig(**d.pop("text", {}))
    return cls(vision=vision, text=text, **d)

  def replace(self, **kw) -> CLIPConfig:
    return dataclasses.replace(self, **kw)


def tiny_config(**overrides) -> CLIPConfig:
  """A CLIP small enough for CPU tests and the demo (random init). Head counts follow OpenAI's
  width // 64 rule, so the config survives a round trip through OpenAI-named weights."""
  cfg = CLIPConfig(
    vision=CLIPVisionConfig(width=64, layers=2, heads=1, mlp_dim=256, patch_size=8, image_size=32),
    text=CLIPTextConfig(width=64, layers=2, heads=1, mlp_dim=256),
    embed_dim=64,
  )
  return dataclasses.replace(cfg, **overrides)


def activation(name: Activation):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":  # HF "gelu" is the exact erf form; jax's default is the tanh approximation.
    return functools.partial(jax.nn.gelu, approximate=False)
  if name == "gelu_tanh":
    return functools.partial(jax.nn.gelu, approximate=True)
  raise ValueError(f"unknown activation {name!r}: expected quick_gelu, gelu or gelu_tanh")


def resolve_attention_impl(impl: AttentionImpl, dtype, head_dim: int) -> str:
  """The implementation `attention` runs for `impl`: `auto` picks cuDNN's fused (flash) attention
  on a GPU for half-precision operands with a head dim cuDNN takes (a multiple of 8, at most
  128), and XLA's otherwise (CPU, TPU, float32); any other choice is returned unchanged."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(
      f"unknown attention implementation {impl!r}: expected one of {ATTENTION_IMPLS}"
    )
  if impl != "auto":
    return impl
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if half and head_dim % 8 == 0 and head_dim <= 128 and jax.default_backend() in ("gpu", "cuda"):
    return "cudnn"
  return "xla"


# Reasons for which `auto` fell back from cuDNN to XLA while tracing (logged once each; the
# benchmark reports them).
CUDNN_FALLBACKS: set[str] = set()

# What each attention call site ran, keyed by its shape, filled while tracing: e.g.
# {"L=17": "cudnn (padded to 18)", "L=77 causal": "cudnn (padded to 78)", "L=50": "cudnn"}.
# The benchmark reports it, so a record says which towers really ran fused attention.
ATTENTION_SITES: dict[str, str] = {}


def _site(length: int, causal: bool) -> str:
  return f"L={length}" + (" causal" if causal else "")


def _round_up(length: int, multiple: int) -> int:
  return -(-length // multiple) * multiple


def padded_attention(
  q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, *, causal: bool, multiple: int, implementation: str
) -> jax.Array:
  """`jax.nn.dot_product_attention` on sequences zero-padded to a multiple of `multiple`, the
  padding kept out of every real token's softmax; returns the L real rows.

  Why: in training, jax's cuDNN path refuses odd sequence lengths (its custom VJP always passes a
  bias operand, so the "patterns with bias need even lengths" check fires; jax 0.11, H200), and
  every length here but B/32's 50 is odd: 17 (16 frames + class token), 77 (text), 197 (B/16).
  Under remat that refusal surfaces only when the backward is traced, outside any fallback.
  Non-causal: the padded keys are masked with `key_value_seq_lengths` (every real query sees
  exactly the L real keys). Causal: no mask is needed, the padded keys come after every real
  query. The padded query rows attend normally (finite values) and are sliced away, so their
  gradient is zero. Values equal unpadded attention up to summation order.
  """
  b, length = q_BxLxHxD.shape[:2]
  padded = _round_up(length, multiple)
  if padded == length:
    return jax.nn.dot_product_attention(
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, is_causal=causal, implementation=implementation
    )
  widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, widths) for t in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  kv_lengths_B = None if causal else jnp.full((b,), length, jnp.int32)
  out_BxPxHxD = jax.nn.dot_product_attention(
    q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths_B, implementation=implementation
  )
  return out_BxPxHxD[:, :length]


# cuDNN gets sequences padded to this multiple (see `padded_attention`).
CUDNN_LENGTH_MULTIPLE = 2


def attention(
  q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, *, causal: bool, impl: AttentionImpl = "xla"
) -> jax.Array:
  """Scaled dot-product attention (scale head_dim ** -0.5), softmax in float32 in every
  implementation; `plain` is the explicit reference formula, `auto` see
  `resolve_attention_impl`; cuDNN runs on sequences padded to an even length."""
  chosen = resolve_attention_impl(impl, q_BxLxHxD.dtype, q_BxLxHxD.shape[-1])
  length = q_BxLxHxD.shape[1]
  site = _site(length, causal)
  if chosen == "plain":
    ATTENTION_SITES[site] = "plain"
    scale = q_BxLxHxD.shape[-1] ** -0.5
    logits = (
      jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32)
      * scale
    )
    if causal:
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxLxHxD.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_BxLxHxD)
  if chosen == "cudnn":
    padded = _round_up(length, CUDNN_LENGTH_MULTIPLE)
    try:
      out = padded_attention(
        q_BxLxHxD,
        k_BxLxHxD,
        v_BxLxHxD,
        causal=causal,
        multiple=CUDNN_LENGTH_MULTIPLE,
        implementation="cudnn",
      )
      ATTENTION_SITES[site] = "cudnn" + (f" (padded to {padded})" if padded != length else "")
      return out
    except (NotImplementedError, RuntimeError, ValueError) as err:
      if impl != "auto":
        raise
      # cuDNN's own checks (library present, version, shapes) run while tracing: when they
      # refuse, `auto` falls back to XLA instead of failing the model.
      if str(err) not in CUDNN_FALLBACKS:
        CUDNN_FALLBACKS.add(str(err))
        logging.warning("attention 'auto': cuDNN refused (%s); using XLA's attention", err)
      chosen = "xla"
  ATTENTION_SITES[site] = chosen
  return jax.nn.dot_product_attention(
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, is_causal=causal, implementation=chosen
  )


def _norm_in_float32(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype (as OpenAI's CLIP does).

  Differentiated, it is recomputed in the backward pass from its input: the backward then keeps
  that one array (in the compute dtype) instead of three float32 intermediates of its size
  (x - mean, the normalised x, the float32 copy), 2 bytes per element in bfloat16 instead of
  12. Recomputing costs one elementwise pass; the values are the same.
  """

  def __init__(self, width: int, eps: float, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(
      width, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.remat(_norm_in_float32)(self.norm, x)


class MultiheadAttention(nnx.Module):
  """Self-attention with fused q/k/v projection (`in_proj` = [q; k; v] as in OpenAI's weights)."""

  def __init__(
    self,
    width: int,
    heads: int,
    *,
    dtype,
    attention_impl: AttentionImpl,
    in_std: float,
    out_std: float,
    rngs: nnx.Rngs,
  ):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by heads {heads}")
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
        f"unknown attention implementation {attention_impl!r}: expected one of {ATTENTION_IMPLS}"
      )
    self.heads = heads
    self.attention_impl = attention_impl
    self.in_proj = nnx.Linear(
      width,
      3 * width,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(in_std),
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )
    self.out_proj = nnx.Linear(
      width,
      width,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(out_std),
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )

  def __call__(self, x_BxLxW: jax.Array, *, causal: bool) -> jax.Array:
    b, length, width = x_BxLxW.shape
    qkv_BxLx3W = self.in_proj(x_BxLxW)
    qkv_BxLx3xHxD = qkv_BxLx3W.reshape(b, length, 3, self.heads, width // self.heads)
    q, k, v = (qkv_BxLx3xHxD[:, :, i] for i in range(3))
    out_BxLxHxD = attention(q, k, v, causal=causal, impl=self.attention_impl)
    return self.out_proj(out_BxLxHxD.reshape(b, length, width))


class MLP(nnx.Module):
  def __init__(
    self,
    width: int,
    hidden: int,
    act: Activation,
    *,
    dtype,
    fc_std: float,
    proj_std: float,
    rngs: nnx.Rngs,
  ):
    self.act = act
    self.c_fc = nnx.Linear(
      width,
      hidden,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(fc_std),
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )
    self.c_proj = nnx.Linear(
      hidden,
      width,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(proj_std),
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    # The activation is recomputed in the backward pass from the c_fc output: the backward
    # keeps two mlp_dim-wide arrays per token (the pre-activation, and the activation that
    # c_proj's weight gradient needs) instead of four (plus the activation's inner terms).
    return self.c_proj(jax.checkpoint(activation(self.act))(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  def __init__(
    self,
    width: int,
    heads: int,
    mlp_dim: int,
    act: Activation,
    eps: float,
    *,
    layers: int,
    dtype,
    attention_impl: AttentionImpl,
    rngs: nnx.Rngs,
  ):
    # OpenAI's initialisation (clip/model.py::initialize_parameters).
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.ln_1 = LayerNorm(width, eps, rngs=rngs)
    self.attn = MultiheadAttention(
      width,
      heads,
      dtype=dtype,
      attention_impl=attention_impl,
      in_std=attn_std,
      out_std=proj_std,
      rngs=rngs,
    )
    self.ln_2 = LayerNorm(width, eps, rngs=rngs)
    self.mlp = MLP(width, mlp_dim, act, dtype=dtype, fc_std=fc_std, proj_std=proj_std, rngs=rngs)

  def __call__(self, x_BxLxW: jax.Array, *, causal: bool) -> jax.Array:
    x_BxLxW = x_BxLxW + self.attn(self.ln_1(x_BxLxW), causal=causal)
    return x_BxLxW + self.mlp(self.ln_2(x_BxLxW))


class Transformer(nnx.Module):
  """A stack of residual attention blocks (`transformer.resblocks.{i}`)."""

  def __init__(
    self,
    width: int,
    layers: int,
    heads: int,
    mlp_dim: int,
    act: Activation,
    eps: float,
    *,
    dtype,
    attention_impl: AttentionImpl,
    remat: bool | str,
    rngs: nnx.Rngs,
  ):
    self.remat = remat_mode(remat)
    self.resblocks = nnx.List(
      [
        ResidualAttentionBlock(
          width,
          heads,
          mlp_dim,
          act,
          eps,
          layers=layers,
          dtype=dtype,
          attention_impl=attention_impl,
          rngs=rngs,
        )
        for _ in range(layers)
      ]
    )

  def __call__(
    self,
    x_BxLxW: jax.Array,
    *,
    causal: bool,
    intermediates: dict[str, jax.Array] | None = None,
    prefix: str = "",
  ) -> jax.Array:
    for i, block in enumerate(self.resblocks):
      if self.remat != "none":
        # Recompute (some of) the block's activations in the backward pass instead of storing
        # them; see `remat_mode`.
        x_BxLxW = nnx.remat(
          lambda blk, y: blk(y, causal=causal), policy=_REMAT_POLICIES[self.remat]
        )(block, x_BxLxW)
      else:
        x_BxLxW = block(x_BxLxW, causal=causal)
      if intermediates is not None:
        intermediates[f"{prefix}block_{i}"] = x_BxLxW
    return x_BxLxW


class VisionTransformer(nnx.Module):
  """CLIP's ViT image tower (`visual.*`)."""

  def __init__(
    self,
    cfg: CLIPVisionConfig,
    embed_dim: int,
    *,
    dtype=jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool | str = "none",
    rngs: nnx.Rngs,
  ):
    self.cfg = cfg
    self.dtype = dtype
    scale = cfg.width**-0.5
    normal = nnx.initializers.normal
    self.conv1 = nnx.Conv(
      3,
      cfg.width,
      kernel_size=(cfg.patch_size, cfg.patch_size),
      strides=(cfg.patch_size, cfg.patch_size),
      padding="VALID",
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    self.class_embedding = nnx.Param(normal(scale)(rngs.params(), (cfg.width,)))
    self.positional_embedding = nnx.Param(
      normal(scale)(rngs.params(), (cfg.grid * cfg.grid + 1, cfg.width))
    )
    self.ln_pre = LayerNorm(cfg.width, cfg.eps, rngs=rngs)
    self.transformer = Transformer(
      cfg.width,
      cfg.layers,
      cfg.heads,
      cfg.mlp_dim,
      cfg.act,
      cfg.eps,
      dtype=dtype,
      attention_impl=attention_impl,
      remat=remat,
      rngs=rngs,
    )
    self.ln_post = LayerNorm(cfg.width, cfg.eps, rngs=rngs)
    self.proj = nnx.Param(normal(scale)(rngs.params(), (cfg.width, embed_dim)))

  def __call__(self, pixels_NxHxWx3: jax.Array, *, return_intermediates: bool = False):
    """Pixels (N, H, W, 3), already preprocessed -> features (N, E), not normalised."""
    n, h, w, c = pixels_NxHxWx3.shape
    if (h, w, c) != (self.cfg.image_size, self.cfg.image_size, 3):
      raise ValueError(
        f"image tower expects (N, {self.cfg.image_size}, {self.cfg.image_size}, 3) "
        f"pixels, got {pixels_NxHxWx3.shape}"
      )
    inter: dict[str, jax.Array] | None = {} if return_intermediates else None
    patches_NxGxGxW = self.conv1(pixels_NxHxWx3.astype(self.dtype))
    x_NxPxW = patches_NxGxGxW.reshape(n, -1, self.cfg.width)
    cls_Nx1xW = jnp.broadcast_to(
      self.class_embedding[...].astype(self.dtype), (n, 1, self.cfg.width)
    )
    x_NxPxW = jnp.concatenate([cls_Nx1xW, x_NxPxW], axis=1)
    x_NxPxW = x_NxPxW + self.positional_embedding[...].astype(self.dtype)
    x_NxPxW = self.ln_pre(x_NxPxW)
    if inter is not None:
      inter["embeddings"] = x_NxPxW
    x_NxPxW = self.transformer(x_NxPxW, causal=False, intermediates=inter)
    pooled_NxW = self.ln_post(x_NxPxW[:, 0])
    feats_NxE = pooled_NxW @ self.proj[...].astype(self.dtype)
    if inter is not None:
      inter["pooled"] = pooled_NxW
      return feats_NxE, inter
    return feats_NxE


class TextTransformer(nnx.Module):
  """CLIP's causal text tower (OpenAI's top-level `token_embedding`, `transformer`, ...)."""

  def __init__(
    self,
    cfg: CLIPTextConfig,
    embed_dim: int,
    *,
    dtype=jnp.float32,
    attention_impl: AttentionImpl = "xla",
    rngs: nnx.Rngs,
  ):
    self.cfg = cfg
    self.dtype = dtype
    normal = nnx.initializers.normal
    self.token_embedding = nnx.Embed(
      cfg.vocab_size,
      cfg.width,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=normal(0.02),
      rngs=rngs,
    )
    self.positional_embedding = nnx.Param(
      normal(0.01)(rngs.params(), (cfg.context_length, cfg.width))
    )
    self.transformer = Transformer(
      cfg.width,
      cfg.layers,
      cfg.heads,
      cfg.mlp_dim,
      cfg.act,
      cfg.eps,
      dtype=dtype,
      attention_impl=attention_impl,
      remat=False,
      rngs=rngs,
    )
    self.ln_final = LayerNorm(cfg.width, cfg.eps, rngs=rngs)
    self.text_projection = nnx.Param(normal(cfg.width**-0.5)(rngs.params(), (cfg.width, embed_dim)))

  def embed_tokens(self, ids_KxL: jax.Array) -> jax.Array:
    """Token ids (K, L) -> token embeddings (K, L, W), without positions."""
    return self.token_embedding(ids_KxL)

  def encode_embeddings(
    self, prompts_KxLxW: jax.Array, eot_K: jax.Array, *, return_intermediates: bool = False
  ):
    """Prompt embeddings (K, L, W) (token embeddings, possibly with learned context in place of
    some tokens) and end-of-text positions (K,) -> features (K, E), not normalised."""
    k, length, width = prompts_KxLxW.shape
    if (length, width) != (self.cfg.context_length, self.cfg.width):
      raise ValueError(
        f"text tower expects (K, {self.cfg.context_length}, {self.cfg.width}) "
        f"prompt embeddings, got {prompts_KxLxW.shape}"
      )
    inter: dict[str, jax.Array] | None = {} if return_intermediates else None
    x_KxLxW = prompts_KxLxW.astype(self.dtype) + self.positional_embedding[...].astype(self.dtype)
    x_KxLxW = self.transformer(x_KxLxW, causal=True, intermediates=inter)
    x_KxLxW = self.ln_final(x_KxLxW)
    # Causal attention: rows up to the first end-of-text token never see the padding, so the
    # pad id (0 in OpenAI's tokenizer, 49407 in HF's) cannot change the pooled features.
    pooled_KxW = x_KxLxW[jnp.arange(k), eot_K]
    feats_KxE = pooled_KxW @ self.text_projection[...].astype(self.dtype)
    if inter is not None:
      inter["pooled"] = pooled_KxW
      return feats_KxE, inter
    return feats_KxE

  def __call__(self, ids_KxL: jax.Array, *, return_intermediates: bool = False):
    """Token ids (K, L) -> features (K, E); pooled at the first end-of-text (largest) id."""
    eot_K = end_of_text_positions(ids_KxL)
    return self.encode_embeddings(
      self.embed_tokens(ids_KxL), eot_K, return_intermediates=return_intermediates
    )


def end_of_text_positions(ids_KxL: jax.Array) -> jax.Array:
  """Position of the first occurrence of the largest id (CLIP's end-of-text token)."""
  return jnp.argmax(ids_KxL, axis=-1)  # argmax returns the first maximal index


class CLIP(nnx.Module):
  """Both towers plus CLIP's learned `logit_scale` (kept for zero-shot use, unused by DFER-CLIP)."""

  def __init__(
    self,
    config: CLIPConfig,
    *,
    dtype=jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool | str = "none",
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.visual = VisionTransformer(
      config.vision,
      config.embed_dim,
      dtype=dtype,
      attention_impl=attention_impl,
      remat=remat,
      rngs=rngs,
    )
    self.text = TextTransformer(
      config.text, config.embed_dim, dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

  def encode_image(self, pixels_NxHxWx3: jax.Array, *, return_intermediates: bool = False):
    return self.visual(pixels_NxHxWx3, return_intermediates=return_intermediates)

  def encode_text(self, ids_KxL: jax.Array, *, return_intermediates: bool = False):
    return self.text(ids_KxL, return_intermediates=return_intermediates)

  def encode_text_embeddings(
    self, prompts_KxLxW: jax.Array, eot_K: jax.Array, *, return_intermediates: bool = False
  ):
    return self.text.encode_embeddings(
      prompts_KxLxW, eot_K, return_intermediates=return_intermediates
    )

  @property
  def token_embedding(self) -> jax.Array:
    """The (vocab, W) token-embedding table."""
    return self.text.token_embedding.embedding[...]


def preset(variant: str, **overrides) -> CLIPConfig:
  """OpenAI's CLIP sizes by name (for random init and benchmarks), plus the CPU-sized `tiny`."""
  if variant == "tiny":
    return tiny_config(**overrides)
  sizes = {
    # name: (vision width, layers, patch, text width, text layers, embed_dim)
    "B/32": (768, 12, 32, 512, 12, 512),
    "B/16": (768, 12, 16, 512, 12, 512),
    "L/14": (1024, 24, 14, 768, 12, 768),
  }
  if variant not in sizes:
    raise ValueError(f"unknown CLIP variant {variant!r}: expected one of {sorted(sizes)} or tiny")
  vw, vl, patch, tw, tl, embed = sizes[variant]
  cfg = CLIPConfig(
    vision=CLIPVisionConfig(
      width=vw, layers=vl, heads=vw // 64, mlp_dim=4 * vw, patch_size=patch, image_size=224
    ),
    text=CLIPTextConfig(width=tw, layers=tl, heads=tw // 64, mlp_dim=4 * tw),
    embed_dim=embed,
  )
  return dataclasses.replace(cfg, **overrides)
