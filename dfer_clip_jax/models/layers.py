"""Layers shared by the DFER-CLIP modules: PyTorch-initialised Linear, LayerNorm, L2 norm."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def torch_linear(fan_in: int, fan_out: int, *, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with PyTorch's default init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(
    fan_in,
    fan_out,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=uniform,
    bias_init=uniform,
    rngs=rngs,
  )


def layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


def l2_normalize(x: jax.Array) -> jax.Array:
  # No epsilon, as the reference's x / x.norm(dim=-1, keepdim=True).
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
