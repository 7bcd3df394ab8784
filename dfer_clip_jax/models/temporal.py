"""The temporal model: frame features (B, T, D) -> a video feature (B, D), chosen by name.

  transformer  [cls, frames] + pos -> `depth` pre-norm blocks -> the cls row (the paper's model)
  mean         the mean of the frame features (the paper's "w/o TM"); `temporal_depth=0` is
               accepted as another name for it

Both return (video feature (B, D) float32, the tokens it was read from). Reference parameter
names: `temporal_net.{cls_token, pos_embedding, temporal_transformer.layers.{i}.{attn,ff}.*}`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfer_clip_jax.models import layers
from dfer_clip_jax.models.clip import AttentionImpl, attention

METHODS = ("transformer", "mean")


class TemporalAttention(nnx.Module):
  """Pre-norm self-attention: one bias-free Linear D -> 3*H*Dh (q, k, v, then heads), no mask,
  output Linear H*Dh -> D with bias.

  Reference names: `layers.{i}.0.fn.{norm, fn.to_qkv, fn.to_out.0}`.
  """

  def __init__(
    self,
    width: int,
    heads: int,
    dim_head: int,
    dropout: float,
    *,
    dtype,
    attention_impl: AttentionImpl,
    rngs: nnx.Rngs,
  ):
    self.heads, self.dim_head = heads, dim_head
    self.attention_impl = attention_impl
    self.norm = layers.layer_norm(width, rngs)
    self.to_qkv = layers.torch_linear(
      width, 3 * heads * dim_head, use_bias=False, dtype=dtype, rngs=rngs
    )
    self.to_out = layers.torch_linear(
      heads * dim_head, width, use_bias=True, dtype=dtype, rngs=rngs
    )
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
    self.norm = layers.layer_norm(width, rngs)
    self.fc1 = layers.torch_linear(width, mlp_dim, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = layers.torch_linear(mlp_dim, width, use_bias=True, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h_BxNxF = jax.nn.gelu(self.fc1(self.norm(x_BxNxD).astype(x_BxNxD.dtype)), approximate=True)
    h_BxNxF = self.dropout(h_BxNxF, deterministic=not train, rngs=rngs)
    return self.dropout(self.fc2(h_BxNxF), deterministic=not train, rngs=rngs)


class TemporalBlock(nnx.Module):
  def __init__(
    self,
    width: int,
    heads: int,
    dim_head: int,
    mlp_dim: int,
    dropout: float,
    *,
    dtype,
    attention_impl: AttentionImpl,
    rngs: nnx.Rngs,
  ):
    self.attn = TemporalAttention(
      width, heads, dim_head, dropout, dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )
    self.ff = TemporalFeedForward(width, mlp_dim, dropout, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    x_BxNxD = x_BxNxD + self.attn(x_BxNxD, train=train, rngs=rngs)
    return x_BxNxD + self.ff(x_BxNxD, train=train, rngs=rngs)


class TemporalEncoder(nnx.Module):
  """`depth` pre-norm blocks (`layers.{i}`), no final LayerNorm."""

  def __init__(
    self,
    width: int,
    depth: int,
    heads: int,
    dim_head: int,
    mlp_dim: int,
    dropout: float,
    *,
    dtype,
    attention_impl: AttentionImpl,
    rngs: nnx.Rngs,
  ):
    self.layers = nnx.List(
      [
        TemporalBlock(
          width,
          heads,
          dim_head,
          mlp_dim,
          dropout,
          dtype=dtype,
          attention_impl=attention_impl,
          rngs=rngs,
        )
        for _ in range(depth)
      ]
    )

  def __call__(self, x_BxNxD: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    for layer in self.layers:
      x_BxNxD = layer(x_BxNxD, train=train, rngs=rngs)
    return x_BxNxD


class TemporalTransformer(nnx.Module):
  """Frame features (B, T, D) -> video feature (B, D), not normalised (docs/method.md, "Video").

  x = [cls, frames] + pos -> depth pre-norm blocks -> x[:, 0]. Depth must be >= 1: with depth 0
  the reference keeps only cls + pos[0], the same vector for every video, so its "w/o TM" results
  cannot come from it; depth 0 names the `mean` method instead.
  """

  def __init__(
    self,
    width: int,
    num_frames: int,
    depth: int,
    heads: int,
    dim_head: int,
    mlp_dim: int,
    dropout: float = 0.0,
    *,
    dtype=jnp.float32,
    attention_impl: AttentionImpl = "xla",
    rngs: nnx.Rngs,
  ):
    if depth < 1:
      raise ValueError(
        f"TemporalTransformer needs depth >= 1, got {depth} (depth 0 is the 'mean' temporal model)"
      )
    self.width, self.num_frames, self.dtype = width, num_frames, dtype
    # Std 1.0, as the reference's torch.randn (not the 0.02 usual for ViTs).
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, width), jnp.float32))
    self.pos_embedding = nnx.Param(
      jax.random.normal(rngs.params(), (1, num_frames + 1, width), jnp.float32)
    )
    self.temporal_transformer = TemporalEncoder(
      width,
      depth,
      heads,
      dim_head,
      mlp_dim,
      dropout,
      dtype=dtype,
      attention_impl=attention_impl,
      rngs=rngs,
    )

  def __call__(
    self, frames_BxTxD: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Returns (video feature (B, D), all output tokens (B, T + 1, D))."""
    b, t, d = frames_BxTxD.shape
    if (t, d) != (self.num_frames, self.width):
      raise ValueError(
        f"temporal transformer expects (B, {self.num_frames}, {self.width}) frame "
        f"features, got {frames_BxTxD.shape}"
      )
    cls_Bx1xD = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x_BxNxD = jnp.concatenate([cls_Bx1xD, frames_BxTxD.astype(jnp.float32)], axis=1)
    x_BxNxD = (x_BxNxD + self.pos_embedding[...]).astype(self.dtype)
    tokens_BxNxD = self.temporal_transformer(x_BxNxD, train=train, rngs=rngs)
    return tokens_BxNxD[:, 0].astype(jnp.float32), tokens_BxNxD


class FrameMean(nnx.Module):
  """The mean of the frame features; no parameters."""

  def __call__(
    self, frames_BxTxD: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
  ) -> tuple[jax.Array, jax.Array]:
    del train, rngs
    return frames_BxTxD.astype(jnp.float32).mean(axis=1), frames_BxTxD


def create(
  method: str,
  *,
  width: int,
  num_frames: int,
  depth: int,
  heads: int,
  dim_head: int,
  mlp_dim: int,
  dropout: float,
  dtype,
  attention_impl: AttentionImpl,
  rngs: nnx.Rngs,
) -> TemporalTransformer | FrameMean:
  """The temporal model named `method` (see the module docstring)."""
  if method == "mean":
    return FrameMean()
  if method == "transformer":
    return TemporalTransformer(
      width,
      num_frames,
      depth,
      heads,
      dim_head,
      mlp_dim,
      dropout,
      dtype=dtype,
      attention_impl=attention_impl,
      rngs=rngs,
    )
  raise ValueError(f"unknown temporal model {method!r}: expected one of {METHODS}")
