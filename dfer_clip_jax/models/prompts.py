"""The prompt learner: learnable context tokens around each class text's token embeddings.

  C prompts [start, ctx_1..ctx_M, class text, end, pad] (class text at the end, in the middle or
  at the front of the context) -> embeddings (C, L, W) for the frozen CLIP text tower.

The class texts are tokenized once (`build_prompt_buffers`); their embeddings are constant model
state (`PromptBuffer`s: saved with the model, never trained), so a restored model needs no
tokenizer. Parameter paths: `prompt_learner.ctx` (the context, a Param),
`prompt_learner.meta_net.{linear1, linear2}.{kernel, bias}` (Co-CoOp's meta-network, conditional
prompts only) and `prompt_learner.{token_prefix, token_suffix, name_lens}` (the buffers).

Conditional prompts (Co-CoOp): a meta-network maps each video's normalised feature (B, D) to a
vector (B, W) added to every context token, so every video has its own C prompts (B, C, L, W).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.models import layers

# The placeholder word whose token embeddings the learnable context replaces (one BPE token).
CONTEXT_PLACEHOLDER = "X"


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
  def zeros(cls, num_classes: int, n_ctx: int, context_length: int, width: int) -> PromptBuffers:
    """Placeholders of the right shapes, to build a model whose buffers are then restored."""
    return cls(
      np.zeros((num_classes, 1, width), np.float32),
      np.zeros((num_classes, context_length - 1 - n_ctx, width), np.float32),
      np.zeros((num_classes,), np.int32),
    )


def prompt_token_ids(
  tokenizer, texts: Sequence[str], n_ctx: int, context_length: int = 77
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
    raise ValueError(
      f"prompt {i} ({prompts[i][:80]!r}) does not tokenize as start + {n_ctx} "
      f"placeholders + {name_lens_C[i]} text tokens + end (end token at "
      f"{eot_C[i]})"
    )
  return ids_CxL, eot_C.astype(np.int32), name_lens_C


def build_prompt_buffers(
  tokenizer,
  texts: Sequence[str],
  n_ctx: int,
  token_embedding_VxW: jax.Array | np.ndarray,
  context_length: int = 77,
) -> PromptBuffers:
  """Embeds the prompts once with the frozen token embedding and splits prefix / suffix."""
  ids_CxL, _, name_lens_C = prompt_token_ids(tokenizer, texts, n_ctx, context_length)
  emb_CxLxW = np.asarray(token_embedding_VxW, np.float32)[ids_CxL]
  return PromptBuffers(emb_CxLxW[:, :1], emb_CxLxW[:, 1 + n_ctx :], name_lens_C)


def context_init_embeddings(
  tokenizer, text: str, n_ctx: int, token_embedding_VxW: jax.Array | np.ndarray
) -> np.ndarray:
  """The token embeddings (M, W) of `text` (e.g. "a photo of a"), to start the context from.

  The text must be exactly n_ctx tokens: each context token starts as one word piece of it.
  """
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if len(ids) != n_ctx:
    raise ValueError(
      f"ctx_init {text!r} is {len(ids)} tokens, but n_ctx is {n_ctx}: the context starts from "
      "one token embedding per context token (set model.n_ctx to its token count, or "
      "model.ctx_init='' for a random start)"
    )
  return np.asarray(token_embedding_VxW, np.float32)[np.asarray(ids)]


class MetaNet(nnx.Module):
  """Co-CoOp's meta-network: a video's normalised feature (B, D) -> Linear(D, D/16) -> ReLU ->
  Linear(D/16, W) -> a bias (B, W) for every context token of that video's prompts."""

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    hidden = max(in_dim // 16, 1)
    self.linear1 = layers.torch_linear(in_dim, hidden, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.linear2 = layers.torch_linear(hidden, out_dim, use_bias=True, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    return self.linear2(jax.nn.relu(self.linear1(x_BxD.astype(jnp.float32))))


def prompt_gather_index(
  position: str, n_ctx: int, name_lens_C: jax.Array, length: int
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
  """Learnable context (CoOp-style) around fixed class-text token embeddings
  (docs/method.md, "Prompts").

  With n_ctx = 0 the prompts are the class texts' token embeddings (manual prompts). With
  `meta_net_in` > 0 (Co-CoOp) the prompts depend on each video (see the module docstring).
  """

  def __init__(
    self,
    buffers: PromptBuffers,
    *,
    n_ctx: int,
    class_specific: bool,
    position: str,
    init_std: float = 0.02,
    ctx_init: np.ndarray | None = None,
    meta_net_in: int = 0,
    rngs: nnx.Rngs,
  ):
    """Args beyond the buffers' shapes: `ctx_init` (M, W) starts every class's context from
    these embeddings instead of N(0, init_std); `meta_net_in` > 0 adds a meta-network reading
    video features of that width (conditional prompts)."""
    c, one, width = np.shape(buffers.token_prefix)
    suffix_shape = np.shape(buffers.token_suffix)
    if (
      one != 1
      or suffix_shape[0] != c
      or suffix_shape[2] != width
      or np.shape(buffers.name_lens) != (c,)
    ):
      raise ValueError(
        f"prompt buffers disagree: prefix {np.shape(buffers.token_prefix)}, "
        f"suffix {suffix_shape}, name_lens {np.shape(buffers.name_lens)}; expected "
        "(C, 1, W), (C, L - 1 - M, W), (C,)"
      )
    self.num_classes, self.width, self.n_ctx = c, width, n_ctx
    self.context_length = 1 + n_ctx + suffix_shape[1]
    self.class_specific, self.position = class_specific, position
    if meta_net_in and not n_ctx:
      raise ValueError("a meta-network needs context tokens to add its output to (n_ctx > 0)")
    if n_ctx:
      shape = (c, n_ctx, width) if class_specific else (n_ctx, width)
      if ctx_init is None:
        ctx = init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
      else:
        if np.shape(ctx_init) != (n_ctx, width):
          raise ValueError(f"ctx_init has shape {np.shape(ctx_init)}, expected {(n_ctx, width)}")
        ctx = jnp.broadcast_to(jnp.asarray(ctx_init, jnp.float32), shape)
      self.ctx = nnx.Param(ctx)
    else:
      self.ctx = None
    self.meta_net = MetaNet(meta_net_in, width, rngs=rngs) if meta_net_in else None
    self.token_prefix = PromptBuffer(jnp.asarray(buffers.token_prefix, jnp.float32))
    self.token_suffix = PromptBuffer(jnp.asarray(buffers.token_suffix, jnp.float32))
    self.name_lens = PromptBuffer(jnp.asarray(buffers.name_lens, jnp.int32))

  @property
  def eot(self) -> jax.Array:
    """End-of-text row of each prompt, (C,)."""
    return 1 + self.n_ctx + self.name_lens[...]

  @property
  def conditional(self) -> bool:
    """Whether the prompts depend on the video (Co-CoOp's meta-network)."""
    return self.meta_net is not None

  def __call__(self, video_BxD: jax.Array | None = None) -> jax.Array:
    """The assembled prompt embeddings: (C, L, W), or (B, C, L, W) for conditional prompts,
    whose meta-network reads the videos' normalised features `video_BxD`."""
    if not self.conditional:
      return self._assemble(None if self.ctx is None else self.ctx[...])
    if video_BxD is None:
      raise ValueError("conditional prompts need the videos' features (video_BxD)")
    bias_BxW = self.meta_net(video_BxD)
    ctx = self.ctx[...]
    # The same bias on every context token (and, with class-specific context, every class).
    bias = bias_BxW[:, None, :] if ctx.ndim == 2 else bias_BxW[:, None, None, :]
    return jax.vmap(self._assemble)(ctx[None] + bias)

  def _assemble(self, ctx: jax.Array | None) -> jax.Array:
    """Context (M, W) shared or (C, M, W) per class, or None -> prompts (C, L, W)."""
    parts = [self.token_prefix[...]]
    if ctx is not None:
      if ctx.ndim == 2:  # shared context: broadcast to the classes before any splitting
        ctx = jnp.broadcast_to(ctx[None], (self.num_classes,) + ctx.shape)
      parts.append(ctx)
    parts.append(self.token_suffix[...])
    pool_CxLxW = jnp.concatenate(parts, axis=1)
    if self.position == "end" or self.n_ctx == 0:
      return pool_CxLxW
    idx_CxL = prompt_gather_index(
      self.position, self.n_ctx, self.name_lens[...], self.context_length
    )
    return jnp.take_along_axis(pool_CxLxW, idx_CxL[:, :, None], axis=1)
