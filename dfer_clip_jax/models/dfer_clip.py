"""DFER-CLIP: CLIP image tower + temporal model vs. learnable-context class prompts.

The model as the reference computes it (docs/method.md), with the paper's baselines as config
presets (`config_lib.BASELINES`):

  video (B, T, H, W, 3) -> CLIP image tower on B*T frames (b-major: row b*T + t) -> (B, T, D)
    -> temporal model (`temporal.py`: transformer with a cls token, or the frame mean)
    -> video features (B, D), L2-normalised
  C prompts (`prompts.py`) -> frozen CLIP text tower -> (C, D), L2-normalised
  logits = video @ text.T * 100  (a fixed scale, as the reference; CLIP's learned scale optional)

Conditional prompts (Co-CoOp, `meta_net`): each video's normalised feature shifts the context of
its own C prompts, so the text features are per video, (B, C, D), and logits[b] = video[b] @
text[b].T * scale. `eval_constants()` is then None and every forward runs the B x C prompts.

Kept from the reference: fixed logit scale 100, tanh-GELU in the temporal FFN, N(0, 1) init of the
temporal cls/pos embeddings, no final LayerNorm or projection after the temporal transformer,
class-specific context by default, the text tower frozen but run on the prompts every step, no
pixel normalisation. Switchable: the frame mean instead of the temporal transformer, shared
context, middle/front class position, text types and manual templates, CLIP's learned logit
scale, a linear classifier head instead of the prompts, CLIP mean/std pixel normalisation.

`DFERCLIPConfig`'s fields are the keys of a run config's `model` section (`DFERCLIPConfig(
class_names=..., **config.model)`); a checkpoint stores the same dict with the class names.

Parameter paths (dotted, as the optimizer's regex groups and the checkpoint importer use them):
  clip.visual.*, clip.text.*, clip.logit_scale      the CLIP towers (OpenAI names)
  temporal_net.{cls_token, pos_embedding, temporal_transformer.layers.{i}.{attn,ff}.*}
  prompt_learner.ctx                                the learnable context (a Param)
  prompt_learner.meta_net.{linear1,linear2}.*       Co-CoOp's meta-network (conditional prompts)
  prompt_learner.{token_prefix, token_suffix, name_lens}   constant buffers (`PromptBuffer`)
  head.{kernel, bias}                               linear-head models only
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfer_clip_jax.models import class_texts as class_texts_lib
from dfer_clip_jax.models import layers
from dfer_clip_jax.models import prompts as prompts_lib
from dfer_clip_jax.models import temporal as temporal_lib
from dfer_clip_jax.models.clip import CLIP, AttentionImpl

TextType = Literal["class_name", "name_with_context", "descriptor", "template"]
Position = Literal["end", "middle", "front"]
Head = Literal["prompt", "linear"]
LogitScale = Literal["fixed", "clip"]
Temporal = Literal["transformer", "mean"]

# Mean / std of OpenAI CLIP's preprocessing (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class DFERCLIPConfig:
  """Everything that shapes the DFER-CLIP model (the CLIP towers have their own `CLIPConfig`).

  Defaults are the paper's model: 8 class-specific context tokens at the end, class descriptors,
  a temporal transformer of depth 1 (8 heads of 64, MLP 1024), 16 frames, logit scale fixed at
  100, [0, 1] pixels. `class_names` come from the data; every other field is a `config.model` key.
  """

  class_names: tuple[str, ...]  # in label order (the dataset's)
  num_frames: int = 16  # frames per clip (T); the temporal position embedding has T + 1 rows
  normalize: bool = False  # CLIP mean/std pixel normalisation (the reference: none)
  # Temporal model: transformer | mean (the frame mean, the paper's "w/o TM"; temporal_depth=0
  # is another name for it).
  temporal: Temporal = "transformer"
  temporal_depth: int = 1  # transformer blocks
  temporal_heads: int = 8  # attention heads of the temporal transformer
  temporal_dim_head: int = 64  # width of each head
  temporal_mlp_dim: int = 1024  # hidden width of its feed-forward layers
  temporal_dropout: float = 0.0  # the reference trains with 0
  # Classifier: "prompt" = cosine similarity to the class prompts' text features (DFER-CLIP,
  # CoOp, zero-shot, manual prompts); "linear" = a Linear layer on the raw video features.
  head: Head = "prompt"
  # Class texts of the prompts (see `class_texts.py`).
  text_type: TextType = "descriptor"
  template: str = ""  # for text_type "template", e.g. "a photo of {}."
  class_texts_file: str = ""  # user texts (JSON or one per line) instead of built-ins
  # Learnable context: n_ctx tokens (0 = manual prompts, nothing learnable in the text branch).
  n_ctx: int = 8
  class_specific: bool = True  # context (C, M, W) per class, else (M, W) shared by all classes
  position: Position = "end"  # where the class text sits relative to the context
  ctx_init_std: float = 0.02  # the context starts from N(0, ctx_init_std) ...
  # ... or from the token embeddings of this text, n_ctx tokens long (Co-CoOp: "a photo of a");
  # the start is stored with the model's parameters, so restoring needs no tokenizer.
  ctx_init: str = ""
  # Conditional prompts (Co-CoOp): a meta-network Linear(D, D/16) -> ReLU -> Linear(D/16, W)
  # maps each video's normalised feature to a vector added to every context token, so each video
  # has its own prompts (B x C prompts through the text tower per step).
  meta_net: bool = False
  # Logits: "fixed" multiplies by fixed_logit_scale (reference: 100); "clip" by exp(CLIP's
  # learned logit_scale).
  logit_scale: LogitScale = "fixed"
  fixed_logit_scale: float = 100.0  # the scale of logit_scale "fixed"

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"DFERCLIPConfig: {msg}")

    if isinstance(self.class_names, str) or not self.class_names:
      fail(f"class_names must be a non-empty sequence of names, got {self.class_names!r}")
    object.__setattr__(self, "class_names", tuple(self.class_names))
    # Written by older exports as None.
    object.__setattr__(self, "template", self.template or "")
    object.__setattr__(self, "class_texts_file", self.class_texts_file or "")
    object.__setattr__(self, "ctx_init", self.ctx_init or "")
    if self.temporal_depth == 0:  # depth 0 names the frame mean
      object.__setattr__(self, "temporal", "mean")
    if self.num_frames < 1:
      fail(f"num_frames must be positive, got {self.num_frames}")
    if self.temporal_depth < 0:
      fail(f"temporal_depth must be >= 0, got {self.temporal_depth}")
    if min(self.temporal_heads, self.temporal_dim_head, self.temporal_mlp_dim) < 1:
      fail("temporal_heads, temporal_dim_head and temporal_mlp_dim must be positive")
    if not 0.0 <= self.temporal_dropout < 1.0:
      fail(f"temporal_dropout must be in [0, 1), got {self.temporal_dropout}")
    for field, allowed in (
      ("temporal", temporal_lib.METHODS),
      ("head", ("prompt", "linear")),
      ("text_type", class_texts_lib.TEXT_TYPES),
      ("position", ("end", "middle", "front")),
      ("logit_scale", ("fixed", "clip")),
    ):
      if getattr(self, field) not in allowed:
        fail(f"{field}={getattr(self, field)!r}, expected one of {allowed}")
    if self.n_ctx < 0:
      fail(f"n_ctx must be >= 0, got {self.n_ctx}")
    if (self.text_type == "template") != bool(self.template):
      fail(
        "template must be set exactly when text_type is 'template' (got text_type="
        f"{self.text_type!r}, template={self.template!r})"
      )
    if self.template and "{}" not in self.template:
      fail(f"template {self.template!r} has no '{{}}' for the class name")
    if (self.meta_net or self.ctx_init) and (self.head != "prompt" or self.n_ctx == 0):
      fail("meta_net and ctx_init act on the learnable context: they need head 'prompt', n_ctx > 0")
    if self.class_texts_file and self.text_type == "template":
      fail("class_texts_file and a template are exclusive: the file gives each class's text")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def texts(self) -> list[str]:
    """Each class's prompt text (without the context placeholders)."""
    if self.class_texts_file:
      return class_texts_lib.load_class_texts(self.class_texts_file, self.class_names)
    return class_texts_lib.class_texts(self.class_names, self.text_type, self.template)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["class_names"] = list(d["class_names"])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DFERCLIPConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"DFERCLIPConfig: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)

  def replace(self, **kw) -> DFERCLIPConfig:
    return dataclasses.replace(self, **kw)


def to_model_input(video_uint8: jax.Array, *, normalize: bool) -> jax.Array:
  """uint8 pixels -> float32 `x / 255`, optionally CLIP mean/std normalised (channels last).

  The single place where pixels become float: the pipeline ships uint8 (4x fewer bytes) and
  the model converts them on the device.
  """
  if video_uint8.dtype != np.uint8:
    raise TypeError(f"expected uint8 pixels, got dtype {video_uint8.dtype}")
  if video_uint8.shape[-1] != 3:
    raise ValueError(f"expected channels-last RGB (..., 3), got shape {video_uint8.shape}")
  x = jnp.asarray(video_uint8).astype(jnp.float32) / jnp.float32(255.0)
  if normalize:
    x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
  return x


class DFERCLIP(nnx.Module):
  """The DFER-CLIP video classifier and its baselines (see the module docstring)."""

  def __init__(
    self,
    config: DFERCLIPConfig,
    clip: CLIP,
    *,
    prompt_buffers: prompts_lib.PromptBuffers | None = None,
    ctx_init: np.ndarray | None = None,
    dtype=jnp.float32,
    attention_impl: AttentionImpl = "xla",
    rngs: nnx.Rngs,
  ):
    """Builds the temporal model and the prompt learner (or linear head) around `clip`.

    Args:
      config: the model config.
      clip: the CLIP towers (its image tower is trained, its text tower is not).
      prompt_buffers: the prompt learner's constants (`build_prompt_buffers`, or from a reference
        checkpoint); required for head "prompt", ignored for head "linear".
      ctx_init: the context's start (M, W) (`prompts.context_init_embeddings`); None = random
        (also when the parameters are about to be restored).
      dtype: compute dtype of the temporal transformer and the head.
      attention_impl: attention implementation of the temporal transformer.
      rngs: parameter initialisation.
    """
    self.config = config
    self.clip = clip
    width = clip.config.embed_dim
    self.width = width
    self.temporal_net = temporal_lib.create(
      config.temporal,
      width=width,
      num_frames=config.num_frames,
      depth=config.temporal_depth,
      heads=config.temporal_heads,
      dim_head=config.temporal_dim_head,
      mlp_dim=config.temporal_mlp_dim,
      dropout=config.temporal_dropout,
      dtype=dtype,
      attention_impl=attention_impl,
      rngs=rngs,
    )
    prompt_learner, head = None, None  # each attribute is assigned once (NNX data vs static)
    if config.head == "prompt":
      if prompt_buffers is None:
        raise ValueError(
          "head 'prompt' needs prompt_buffers (see build_prompt_buffers or create_dfer_clip)"
        )
      if prompt_buffers.num_classes != config.num_classes:
        raise ValueError(
          f"prompt buffers hold {prompt_buffers.num_classes} classes, config "
          f"says {config.num_classes}"
        )
      suffix_len = np.shape(prompt_buffers.token_suffix)[1]
      text_cfg = clip.config.text
      if 1 + config.n_ctx + suffix_len != text_cfg.context_length:
        raise ValueError(
          f"prompt suffix of {suffix_len} rows with n_ctx={config.n_ctx} does not "
          f"fill the text context of {text_cfg.context_length}"
        )
      prompt_learner = prompts_lib.PromptLearner(
        prompt_buffers,
        n_ctx=config.n_ctx,
        class_specific=config.class_specific,
        position=config.position,
        init_std=config.ctx_init_std,
        ctx_init=ctx_init,
        meta_net_in=width if config.meta_net else 0,
        rngs=rngs,
      )
    else:
      head = layers.torch_linear(width, config.num_classes, use_bias=True, dtype=dtype, rngs=rngs)
    self.prompt_learner = prompt_learner
    self.head = head

  def text_features(
    self, video_BxD: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(text features normalised, raw, prompts) of the class prompts: (C, D), (C, D), (C, L, W);
    for conditional prompts, of each video's prompts from its normalised feature `video_BxD`:
    (B, C, D), (B, C, D), (B, C, L, W)."""
    learner = self.prompt_learner
    if learner is None:
      raise ValueError("a linear-head model has no text features")
    prompts = learner(video_BxD) if learner.conditional else learner()
    eot_C = learner.eot
    if prompts.ndim == 3:
      raw = self.clip.encode_text_embeddings(prompts, eot_C).astype(jnp.float32)
      return layers.l2_normalize(raw), raw, prompts
    b, c, length, width = prompts.shape  # one text-tower batch of B*C prompts, b-major
    raw_NxD = self.clip.encode_text_embeddings(
      prompts.reshape(b * c, length, width), jnp.tile(eot_C, b)
    )
    raw_BxCxD = raw_NxD.reshape(b, c, -1).astype(jnp.float32)
    return layers.l2_normalize(raw_BxCxD), raw_BxCxD, prompts

  def logit_scale(self) -> jax.Array:
    if self.config.logit_scale == "clip":
      return jnp.exp(self.clip.logit_scale[...])
    return jnp.asarray(self.config.fixed_logit_scale, jnp.float32)

  def __call__(
    self,
    video_BxTxHxWx3: jax.Array,
    *,
    train: bool,
    rngs: nnx.Rngs | None = None,
    text_features: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Video clips -> (logits (B, C), aux).

    Args:
      video_BxTxHxWx3: float32 pixels, preprocessed as the CLIP tower expects (the reference:
        [0, 1], no mean/std normalisation).
      train: enables dropout (the reference's dropout is 0, so train and eval agree there).
      rngs: dropout randomness (`nnx.Rngs(dropout=key)`), needed when training with dropout > 0.
      text_features: precomputed normalised (C, D) text features (`eval_constants()`, once per
        evaluation); computed when None (always for conditional prompts, per video).

    Returns:
      logits (B, C) and aux with frame_features (B, T, D) (raw CLIP image features),
      video_features (B, D) / video_features_raw, and for the prompt head text_features (C, D)
      or per video (B, C, D), plus text_features_raw and prompts when computed here.
    """
    if video_BxTxHxWx3.ndim != 5 or video_BxTxHxWx3.shape[-1] != 3:
      raise ValueError(f"expected video (B, T, H, W, 3), got {video_BxTxHxWx3.shape}")
    b, t, h, w, _ = video_BxTxHxWx3.shape
    if t != self.config.num_frames:
      raise ValueError(
        f"expected {self.config.num_frames} frames per clip, got video {video_BxTxHxWx3.shape}"
      )
    if train and self.config.temporal_dropout > 0 and rngs is None:
      raise ValueError("training with temporal_dropout > 0 needs rngs=nnx.Rngs(dropout=key)")
    d = self.width
    frames_NxHxWx3 = video_BxTxHxWx3.reshape(b * t, h, w, 3)  # b-major: row b*T + t
    frame_NxD = self.clip.encode_image(frames_NxHxWx3)
    assert frame_NxD.shape == (b * t, d), frame_NxD.shape
    frame_BxTxD = frame_NxD.reshape(b, t, d).astype(jnp.float32)
    aux: dict[str, jax.Array] = {"frame_features": frame_BxTxD}
    video_raw_BxD, _ = self.temporal_net(frame_BxTxD, train=train, rngs=rngs)
    assert video_raw_BxD.shape == (b, d), video_raw_BxD.shape
    video_BxD = layers.l2_normalize(video_raw_BxD)
    aux["video_features_raw"] = video_raw_BxD
    aux["video_features"] = video_BxD
    if self.head is not None:
      logits_BxC = self.head(video_raw_BxD).astype(jnp.float32)
    else:
      if text_features is None:
        text_features, aux["text_features_raw"], aux["prompts"] = self.text_features(video_BxD)
      elif self.prompt_learner.conditional:
        raise ValueError("conditional prompts compute their text features per video")
      aux["text_features"] = text_features
      c = self.config.num_classes
      if text_features.ndim == 3:  # per video
        assert text_features.shape == (b, c, d), text_features.shape
        logits_BxC = jnp.einsum("bd,bcd->bc", video_BxD, text_features) * self.logit_scale()
      else:
        assert text_features.shape == (c, d), text_features.shape
        logits_BxC = video_BxD @ text_features.T * self.logit_scale()
    return logits_BxC, aux

  def preprocess(self, video_uint8: jax.Array) -> jax.Array:
    """uint8 clips (B, T, H, W, 3) -> the float pixels this model reads."""
    return to_model_input(video_uint8, normalize=self.config.normalize)

  def eval_constants(self) -> jax.Array | None:
    """What an evaluation computes once for all its videos and passes to `probabilities`: the
    class prompts' text features (C, D), which do not depend on the video; None for a linear
    head. A model whose text features depend on each video (conditional prompts) returns None."""
    if self.prompt_learner is None or self.prompt_learner.conditional:
      return None
    return self.text_features()[0]

  def probabilities(self, video_uint8: jax.Array, constants: jax.Array | None = None) -> jax.Array:
    """The evaluation forward pass: uint8 clips (B, T, H, W, 3) -> class probabilities (B, C)."""
    logits_BxC, _ = self(self.preprocess(video_uint8), train=False, text_features=constants)
    return jax.nn.softmax(logits_BxC.astype(jnp.float32), axis=-1)


def eval_functions(graphdef):
  """Jitted (model state -> eval constants, (model state, uint8 clips, constants) -> probs) of
  the models of `graphdef`; the evaluator and the predictor run these."""
  constants = jax.jit(lambda state: nnx.merge(graphdef, state).eval_constants())
  probs = jax.jit(
    lambda state, video_uint8, consts: nnx.merge(graphdef, state).probabilities(video_uint8, consts)
  )
  return constants, probs


def create_dfer_clip(
  config: DFERCLIPConfig,
  clip: CLIP,
  tokenizer=None,
  *,
  texts: Sequence[str] | None = None,
  dtype=jnp.float32,
  attention_impl: AttentionImpl = "xla",
  rngs: nnx.Rngs,
) -> DFERCLIP:
  """Builds a DFER-CLIP model on a (pretrained) CLIP, tokenizing the class prompts once.

  `texts` overrides the config's class texts (one per class); the tokenizer is needed for the
  prompt head only.
  """
  buffers, ctx_init = None, None
  if config.head == "prompt":
    if tokenizer is None:
      raise ValueError("head 'prompt' needs a tokenizer to build the class prompts")
    texts = list(texts) if texts is not None else config.texts()
    if len(texts) != config.num_classes:
      raise ValueError(f"got {len(texts)} class texts for {config.num_classes} classes")
    buffers = prompts_lib.build_prompt_buffers(
      tokenizer, texts, config.n_ctx, clip.token_embedding, clip.config.text.context_length
    )
    if config.ctx_init:
      ctx_init = prompts_lib.context_init_embeddings(
        tokenizer, config.ctx_init, config.n_ctx, clip.token_embedding
      )
  return DFERCLIP(
    config,
    clip,
    prompt_buffers=buffers,
    ctx_init=ctx_init,
    dtype=dtype,
    attention_impl=attention_impl,
    rngs=rngs,
  )
