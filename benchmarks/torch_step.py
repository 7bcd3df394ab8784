r"""The DFER-CLIP training step in PyTorch, built as that ecosystem builds it, timed as ours is.

    python benchmarks/torch_step.py --variant=B/32 --frames=16 --batch=48 --impl=fp32 \
        --json=out.json [--steps=20 --warmup=3] [--workdir=DIR] [--clip_dir=HF_CLIP_FOLDER]
    python benchmarks/torch_step.py --variant=B/16 --frames=16 --batch=48 --impl=bf16-compile \
        --json=out.json
    python benchmarks/torch_step.py --variant=tiny --frames=2 --batch=2 --steps=2 --warmup=1 \
        --impl=bf16 --device=cpu          # CPU smoke run

Run from the repository root (the script puts the root on `sys.path`). It exists to put a number
beside `python -m dfer_clip_jax.benchmarks.train_step` on the same GPU: what a PyTorch user
would otherwise run. torch and transformers are benchmark/test-only dependencies: the package
never imports this file.

The model (the same work as `dfer_clip_jax/models/dfer_clip.py::DFERCLIP`, proven on the CPU by
`tests/test_torch_step.py`):
  * CLIP towers: transformers' PyTorch `CLIPModel` with `attn_implementation="sdpa"`, randomly
    initialised from a `CLIPConfig` of `--variant`'s sizes (`dfer_clip_jax.models.clip.preset`,
    text vocabulary `dfer_clip_jax.state.DEMO_VOCAB`, as our random-init CLIPs), or loaded from
    a local Hugging Face CLIP folder (`--clip_dir`).
  * video (B, T, H, W, 3) uint8 on the device -> float32 / 255 inside the step (as our trainer's
    `DFERCLIP.preprocess` with the paper's normalize=False) -> B*T frames, b-major
    (row b*T + t) -> image tower (`vision_model` + `visual_projection`) -> (B, T, D).
  * temporal transformer with a class token: [cls, frames] + pos, pre-norm blocks (LayerNorm ->
    bias-free Linear D -> 3*H*Dh -> softmax attention, scale Dh^-0.5 -> Linear H*Dh -> D;
    LayerNorm -> Linear -> tanh-GELU -> Linear), no final LayerNorm, output = row 0.
  * class-specific prompt learner: per class [start-token embedding, M = 8 learned context
    vectors, embeddings of the class text, end token and padding], fed as `inputs_embeds` to the
    frozen text tower at every step (its embeddings add positions, its encoder runs causal SDPA,
    final LayerNorm, pooled at each prompt's end-of-text row 1 + M + name_len,
    `text_projection`). Class texts: the paper's 7 DFEW descriptors, tokenized as our benchmark
    tokenizes them (the offline demo tokenizer for a random-init CLIP; the folder's own
    vocabulary with `--clip_dir`).
  * logits = normalised video @ normalised text.T * 100 (fixed), cross-entropy, SGD momentum
    0.9, weight decay 1e-4 (coupled, PyTorch's SGD), learning rates temporal 1e-2, image tower
    1e-5, context 1e-3; the text tower and the token embeddings frozen (requires_grad False: the
    backward only carries activation gradients through the text tower to the context).

Variants (`--impl`):
  fp32          what the authors ran: float32, eager, and true fp32 matmuls and convolutions
                (TF32 off), like ours at matmul precision "highest".
  bf16          `torch.autocast(bfloat16)` around the forward, SDPA attention, eager.
  bf16-compile  the same under `torch.compile` (the forward and loss; AOTAutograd compiles
                the backward; the optimizer step runs eagerly with foreach kernels).
The normalisations and logits (B x C, tiny) run in float32 in every variant, as ours do.

Record: the same fields as `dfer_clip_jax.benchmarks.train_step` (see its docstring), plus
`framework: "torch"` and `impl`. Timing protocol: the first step (`compile_s`: for
bf16-compile, Dynamo + Inductor compiling the forward and backward, then running them; for the
eager variants, the first step's lazy cuBLAS/cuDNN set-up), `--warmup` - 1 more untimed steps,
then `--steps` steps timed one by one, each followed by a device synchronisation
(`step_ms_p50/p90/min/mean`), then `--steps` more dispatched back to back and synchronised once
(`step_ms_pipelined`; `clips_per_s` and `frames_per_s` use it). The steps cycle through 4 random
uint8 batches made on the device, as ours. FLOPs: `analytic_flops` of `train_step`, the same
count for the same model (`model_tflops_per_step`, `achieved_tflops`, `mfu` against
`train_step.PEAK_TFLOPS` for the arithmetic used). `peak_memory_gb`: `torch.cuda.
max_memory_allocated` (GB = 1e9 bytes; the reserved peak as `peak_memory_reserved_gb`; null on
the CPU). Fields with no torch counterpart are null (`xla_tflops_per_step`, `xla_over_analytic`)
or fixed (`remat` none, `microbatches` 1, `attention_used` sdpa). A batch that does not fit is a
result (`status: "oom"`, exit code 0), any other failure `status: "error"` (exit code 1); the
JSON is written in every case.

Start-up check: `text_path_check_max_abs_err` compares the prompt path, fed the prompts' plain
token embeddings, with transformers' own text forward on the token ids; above 1e-3 the run is an
error (a transformers version whose encoder ignores `is_causal` would otherwise time other work).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if (
  str(REPO) not in sys.path
):  # `python benchmarks/torch_step.py` puts benchmarks/ first, not the root
  sys.path.insert(0, str(REPO))
if "jax" not in sys.modules:
  # We import our package only for its configs, tokenizer and FLOP count, which need no
  # accelerator: keep JAX off the GPU so it neither initialises CUDA nor preallocates memory that
  # torch is about to measure.
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch import nn  # pylint: disable=g-import-not-at-top,wrong-import-position

from dfer_clip_jax import state as state_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.benchmarks import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.benchmarks.train_step import analytic_flops, arithmetic_of, is_oom, peak_tflops  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.conversion import clip_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.data import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.models import dfer_clip as dfer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax.models import prompts as prompts_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = ("B/32", "B/16", "L/14", "tiny")
IMPLS = ("fp32", "bf16", "bf16-compile")
NUM_BATCHES = 4  # distinct random batches the timed steps cycle through (as train_step)
# The paper's optimizer (dfer_clip_jax/config_lib.py: optim.*), the same numbers as our trainer's defaults.
LR_TEMPORAL, LR_IMAGE, LR_PROMPT = 1e-2, 1e-5, 1e-3
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4


# ----------------------------------------------------------------------------------------------
# The CLIP towers


def hf_clip_config(variant: str) -> transformers.CLIPConfig:
  """transformers' CLIPConfig of our random-init CLIP of `variant` (`clip.preset`, text vocabulary
  `state.DEMO_VOCAB`), SDPA attention."""
  c = clip_lib.preset(variant)
  v, t = c.vision, c.text
  vocab = state_lib.DEMO_VOCAB
  text = dict(
    vocab_size=vocab,
    hidden_size=t.width,
    intermediate_size=t.mlp_dim,
    num_hidden_layers=t.layers,
    num_attention_heads=t.heads,
    max_position_embeddings=t.context_length,
    hidden_act=t.act,
    layer_norm_eps=t.eps,
    # The demo tokenizer's special ids (its last two): HF's own text forward then pools
    # where ours does, which `check_text_path` relies on.
    bos_token_id=vocab - 2,
    eos_token_id=vocab - 1,
    pad_token_id=vocab - 1,
  )
  vision = dict(
    hidden_size=v.width,
    intermediate_size=v.mlp_dim,
    num_hidden_layers=v.layers,
    num_attention_heads=v.heads,
    patch_size=v.patch_size,
    image_size=v.image_size,
    hidden_act=v.act,
    layer_norm_eps=v.eps,
  )
  return transformers.CLIPConfig(
    text_config=text,
    vision_config=vision,
    projection_dim=c.embed_dim,
    logit_scale_init_value=c.logit_scale_init,
    attn_implementation="sdpa",
  )


def clip_config_of(hf_config: transformers.CLIPConfig) -> clip_lib.CLIPConfig:
  """Our CLIPConfig describing a transformers CLIP (for the shared analytic FLOP count): the
  converter's own reading of a Hugging Face config."""
  return clip_weights.config_from_hf(hf_config.to_dict())


def load_clip(variant: str, clip_dir: str | None, device: torch.device) -> transformers.CLIPModel:
  """The CLIP towers: random init of `variant` (made directly on `device`), or `clip_dir`."""
  if clip_dir:
    return transformers.CLIPModel.from_pretrained(clip_dir, attn_implementation="sdpa").to(device)
  with device:  # parameters created (and initialised) on the device: no host copy of B/16
    return transformers.CLIPModel(hf_clip_config(variant))


# ----------------------------------------------------------------------------------------------
# The DFER-CLIP modules around the towers


class TemporalAttention(nn.Module):
  """Pre-norm self-attention: LayerNorm, bias-free Linear D -> 3*H*Dh, SDPA (scale Dh^-0.5, no
  mask), Linear H*Dh -> D with bias. Names as ours (`attn.{norm, to_qkv, to_out}`)."""

  def __init__(self, width: int, heads: int, dim_head: int):
    super().__init__()
    self.heads, self.dim_head = heads, dim_head
    self.norm = nn.LayerNorm(width, eps=1e-5)
    self.to_qkv = nn.Linear(width, 3 * heads * dim_head, bias=False)
    self.to_out = nn.Linear(heads * dim_head, width)

  def forward(self, x_BxNxD: torch.Tensor) -> torch.Tensor:
    b, n, _ = x_BxNxD.shape
    qkv = self.to_qkv(self.norm(x_BxNxD)).view(b, n, 3, self.heads, self.dim_head)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
    out_BxHxNxDh = F.scaled_dot_product_attention(q, k, v)  # default scale: Dh ** -0.5
    return self.to_out(out_BxHxNxDh.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class TemporalFeedForward(nn.Module):
  """Pre-norm MLP D -> mlp_dim -> D with the tanh-approximated GELU (`ff.{norm, fc1, fc2}`)."""

  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.norm = nn.LayerNorm(width, eps=1e-5)
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class TemporalBlock(nn.Module):
  def __init__(self, width: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.attn = TemporalAttention(width, heads, dim_head)
    self.ff = TemporalFeedForward(width, mlp_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(x)
    return x + self.ff(x)


class TemporalEncoder(nn.Module):
  def __init__(self, width: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.layers = nn.ModuleList(
      [TemporalBlock(width, heads, dim_head, mlp_dim) for _ in range(depth)]
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for layer in self.layers:
      x = layer(x)
    return x  # no final LayerNorm (the reference has none)


class TemporalTransformer(nn.Module):
  """Frame features (B, T, D) -> video feature (B, D): [cls, frames] + pos -> blocks -> row 0.
  Parameter names follow ours (`temporal_net.{cls_token, pos_embedding, temporal_transformer.
  layers.{i}.{attn, ff}.*}`), so copying weights between the two is renaming plus transposes."""

  def __init__(
    self, width: int, num_frames: int, depth: int, heads: int, dim_head: int, mlp_dim: int
  ):
    super().__init__()
    self.num_frames = num_frames
    # N(0, 1) as the reference's torch.randn.
    self.cls_token = nn.Parameter(torch.randn(1, 1, width))
    self.pos_embedding = nn.Parameter(torch.randn(1, num_frames + 1, width))
    self.temporal_transformer = TemporalEncoder(width, depth, heads, dim_head, mlp_dim)

  def forward(self, frames_BxTxD: torch.Tensor) -> torch.Tensor:
    b = frames_BxTxD.shape[0]
    x = torch.cat([self.cls_token.expand(b, -1, -1), frames_BxTxD.float()], dim=1)
    return self.temporal_transformer(x + self.pos_embedding)[:, 0]


class PromptLearner(nn.Module):
  """Class-specific learnable context (C, M, W) between the start token's embedding and the
  embeddings of the class text, end token and padding (constant buffers, as ours)."""

  def __init__(
    self,
    token_embeds_CxLxW: torch.Tensor,
    name_lens_C: Sequence[int],
    n_ctx: int,
    init_std: float = 0.02,
  ):
    super().__init__()
    c, _, width = token_embeds_CxLxW.shape
    self.n_ctx = n_ctx
    self.ctx = nn.Parameter(
      init_std * torch.randn(c, n_ctx, width, device=token_embeds_CxLxW.device)
    )
    self.register_buffer("token_prefix", token_embeds_CxLxW[:, :1].detach().clone())
    self.register_buffer("token_suffix", token_embeds_CxLxW[:, 1 + n_ctx :].detach().clone())
    eot = 1 + n_ctx + torch.as_tensor(np.asarray(name_lens_C), dtype=torch.long)
    self.register_buffer("eot", eot.to(token_embeds_CxLxW.device))  # end-of-text row per prompt
    self.register_buffer("rows", torch.arange(c, device=token_embeds_CxLxW.device))

  def forward(self) -> torch.Tensor:
    return torch.cat([self.token_prefix, self.ctx, self.token_suffix], dim=1)


class DFERCLIP(nn.Module):
  """transformers' CLIP towers + temporal transformer + prompt learner; `forward(video uint8)`
  gives float32 logits (B, C)."""

  def __init__(
    self,
    clip: transformers.CLIPModel,
    prompt_ids_CxL: np.ndarray,
    name_lens_C: np.ndarray,
    config: dfer_lib.DFERCLIPConfig,
    *,
    normalize: bool = False,
  ):
    """`config` is our model config (what our DFERCLIP is built from): the sizes of the temporal
    transformer and the prompts, the fixed logit scale. Only the paper's model is built here:
    temporal depth >= 1, class-specific context at the end of the prompt, fixed scale, no
    dropout."""
    super().__init__()
    if (
      config.temporal != "transformer"
      or config.head != "prompt"
      or config.n_ctx < 1
      or not config.class_specific
      or config.position != "end"
      or config.logit_scale != "fixed"
      or config.temporal_dropout
    ):
      raise ValueError(f"the torch step builds only the paper's DFER-CLIP, got {config}")
    self.clip = clip
    self.dfer_config = config
    device = clip.logit_scale.device
    # Frozen: the text tower with its token embeddings and projection, and CLIP's logit scale.
    for p in [*clip.text_model.parameters(), *clip.text_projection.parameters(), clip.logit_scale]:
      p.requires_grad_(False)
    self.temporal_net = TemporalTransformer(
      clip.visual_projection.out_features,
      config.num_frames,
      config.temporal_depth,
      config.temporal_heads,
      config.temporal_dim_head,
      config.temporal_mlp_dim,
    ).to(device)
    with torch.no_grad():
      ids = torch.as_tensor(np.asarray(prompt_ids_CxL), dtype=torch.long, device=device)
      token_embeds = clip.text_model.embeddings.token_embedding(ids)
    self.prompt_learner = PromptLearner(
      token_embeds, name_lens_C, config.n_ctx, config.ctx_init_std
    )
    self.register_buffer("prompt_ids", ids)  # for `check_text_path`
    self.logit_scale = config.fixed_logit_scale
    self.normalize = normalize
    self.register_buffer("mean", torch.tensor(dfer_lib.CLIP_MEAN, device=device))
    self.register_buffer("std", torch.tensor(dfer_lib.CLIP_STD, device=device))

  def encode_frames(self, video_BxTxHxWx3: torch.Tensor) -> torch.Tensor:
    """uint8 video -> raw CLIP image features of its frames (B, T, D), float32."""
    b, t, h, w, _ = video_BxTxHxWx3.shape
    x = video_BxTxHxWx3.to(torch.float32) / 255.0  # our to_model_input, in the step
    if self.normalize:
      x = (x - self.mean) / self.std
    # b-major frames (row b*T + t); NHWC -> NCHW is a view (channels-last memory, which cuDNN's
    # convolutions take as they are).
    pixels_NxCxHxW = x.reshape(b * t, h, w, 3).permute(0, 3, 1, 2)
    pooled = self.clip.vision_model(pixel_values=pixels_NxCxHxW).pooler_output
    return self.clip.visual_projection(pooled).float().view(b, t, -1)

  def encode_video(self, video_BxTxHxWx3: torch.Tensor) -> torch.Tensor:
    """uint8 video -> raw video features (B, D), float32."""
    return self.temporal_net(self.encode_frames(video_BxTxHxWx3)).float()

  def encode_prompts(self, prompts_CxLxW: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt embeddings (default: the prompt learner's) -> raw text features (C, D), through
    the pieces of HF's CLIPTextTransformer.forward (which only takes token ids): embeddings with
    `inputs_embeds` (+ positions), the encoder with causal attention (SDPA's is_causal, what
    HF's own causal mask becomes under SDPA without padding), final LayerNorm, pooling at each
    prompt's end-of-text row, text_projection."""
    text = self.clip.text_model
    if prompts_CxLxW is None:
      prompts_CxLxW = self.prompt_learner()
    h = text.embeddings(inputs_embeds=prompts_CxLxW)
    h = text.encoder(inputs_embeds=h, attention_mask=None, is_causal=True).last_hidden_state
    h = text.final_layer_norm(h)
    pooled_CxW = h[self.prompt_learner.rows, self.prompt_learner.eot]
    return self.clip.text_projection(pooled_CxW).float()

  def forward(self, video_BxTxHxWx3: torch.Tensor) -> torch.Tensor:
    video = self.encode_video(video_BxTxHxWx3)
    text = self.encode_prompts()
    # Normalisations and logits in float32 whatever the autocast (ours: float32 logits).
    with torch.autocast(video.device.type, enabled=False):
      video = video / video.norm(dim=-1, keepdim=True)
      text = text / text.norm(dim=-1, keepdim=True)
      return video @ text.T * self.logit_scale

  def param_groups(
    self, lr_temporal: float = LR_TEMPORAL, lr_image: float = LR_IMAGE, lr_prompt: float = LR_PROMPT
  ) -> list[dict[str, Any]]:
    """The reference's three SGD groups; everything else is frozen (not given to SGD)."""
    image = [*self.clip.vision_model.parameters(), *self.clip.visual_projection.parameters()]
    return [
      {"name": "temporal", "params": list(self.temporal_net.parameters()), "lr": lr_temporal},
      {"name": "image", "params": image, "lr": lr_image},
      {"name": "prompt", "params": [self.prompt_learner.ctx], "lr": lr_prompt},
    ]


def make_optimizer(model: DFERCLIP, **lrs) -> torch.optim.SGD:
  # PyTorch SGD: coupled weight decay (g + wd * p), momentum buffer starting at the first g.
  return torch.optim.SGD(
    model.param_groups(**lrs), lr=LR_IMAGE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
  )


def check_text_path(model: DFERCLIP) -> float | None:
  """Max abs difference between our prompt path fed the prompts' plain token embeddings and HF's
  own text forward on the token ids (`get_text_features`): proves the causal mask, positions,
  pooling and projection are HF's. None where HF's pooling rule cannot find our end token
  (config eos id neither 2, HF's legacy argmax rule, nor the tokenizer's end id)."""
  clip, ids = model.clip, model.prompt_ids
  eos = clip.config.text_config.eos_token_id
  if eos != 2 and not bool((ids[model.prompt_learner.rows, model.prompt_learner.eot] == eos).all()):
    return None
  with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
    ours = model.encode_prompts(clip.text_model.embeddings.token_embedding(ids))
    theirs = clip.get_text_features(input_ids=ids)
    theirs = getattr(theirs, "pooler_output", theirs)  # transformers 5 returns an output object
    return float((ours - theirs.float()).abs().max())


def prompt_tokens(
  clip_dir: str | None, workdir: pathlib.Path, texts: Sequence[str], n_ctx: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """(ids (C, L), name_lens (C,)) of the prompts "X X ... X <class text>", tokenized as our
  `state.build_model` tokenizes them: the folder's vocabulary, or the offline demo tokenizer
  trained on the class texts for a random-init CLIP."""
  if clip_dir and (pathlib.Path(clip_dir) / "vocab.json").is_file():
    tok = tokenizer_lib.load_tokenizer(clip_dir)
  else:
    from dfer_clip_jax import demo_tokenizer  # pylint: disable=g-import-not-at-top

    folder = workdir / "tokenizer"
    if not (folder / "vocab.json").is_file():
      demo_tokenizer.build_demo_tokenizer(folder, list(texts), vocab_size=state_lib.DEMO_VOCAB)
    tok = tokenizer_lib.load_tokenizer(folder)
  ids, _, name_lens = prompts_lib.prompt_token_ids(tok, texts, n_ctx, context_length)
  return ids, name_lens


def paper_config(frames: int = 16) -> dfer_lib.DFERCLIPConfig:
  """The paper's DFER-CLIP on DFEW (our config's defaults, as configs/dfew.py): 7 classes with
  their descriptors, 8 class-specific context tokens, temporal depth 1 (8 heads of 64, MLP 1024),
  logit scale 100."""
  return dfer_lib.DFERCLIPConfig(class_names=datasets.DFEW_CLASSES, num_frames=frames)


def build(
  *,
  variant: str = "B/32",
  clip_dir: str | None = None,
  frames: int = 16,
  device: torch.device | str = "cpu",
  workdir: str | os.PathLike | None = None,
  seed: int = 0,
  config: dfer_lib.DFERCLIPConfig | None = None,
) -> DFERCLIP:
  """The torch DFER-CLIP model on `device`: `config` (default `paper_config(frames)`) around
  a random-init CLIP of `variant` or the HF folder `clip_dir`."""
  device = torch.device(device)
  config = config or paper_config(frames)
  torch.manual_seed(seed)
  clip = load_clip(variant, clip_dir, device).train()
  with tempfile.TemporaryDirectory(prefix="torch_step_") as tmp:
    ids, name_lens = prompt_tokens(
      clip_dir,
      pathlib.Path(workdir or tmp),
      config.texts(),
      config.n_ctx,
      clip.config.text_config.max_position_embeddings,
    )
  return DFERCLIP(clip, ids, name_lens, config).to(device).train()


def flops(model: DFERCLIP, batch: int) -> dict[str, float]:
  """`train_step.analytic_flops` of this model: the same count as ours for the same sizes."""
  return analytic_flops(clip_config_of(model.clip.config), model.dfer_config, batch, "train")


# ----------------------------------------------------------------------------------------------
# The step


def make_train_step(
  model: DFERCLIP, optimizer: torch.optim.Optimizer, impl: str, compile_mode: str = "default"
):
  """step(video uint8 (B, T, H, W, 3), labels (B,)) -> (loss, accuracy), both device tensors;
  updates the model in place. No host synchronisation inside."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  bf16 = impl != "fp32"
  device_type = model.clip.logit_scale.device.type

  def loss_fn(video, labels):
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
      logits = model(video)
    loss = F.cross_entropy(logits.float(), labels)  # the loss in float32, as ours
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy

  if impl == "bf16-compile":
    loss_fn = torch.compile(loss_fn, mode=None if compile_mode == "default" else compile_mode)

  def step(video, labels):
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = loss_fn(video, labels)
    loss.backward()
    optimizer.step()
    return loss.detach(), accuracy.detach()

  return step


def set_precision(impl: str) -> dict[str, Any]:
  """fp32: true fp32 matmuls and convolutions (TF32 off, as ours at precision "highest"); bf16:
  PyTorch's defaults (the bf16 variants' matmuls run in bf16 under autocast anyway). Returns the
  settings for the record."""
  if impl == "fp32":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
  # Usual in training scripts (the reference's too): cuDNN picks the patch convolution's fastest
  # algorithm for the fixed input shape.
  torch.backends.cudnn.benchmark = True
  return {
    "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
    "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    "float32_matmul_precision": torch.get_float32_matmul_precision(),
    "cudnn_benchmark": True,
  }


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def make_batches(
  model: DFERCLIP, batch: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
  """`NUM_BATCHES` random uint8 batches and labels, made on the device (no host transfer is
  timed); different batches because a step on one repeated batch soon saturates."""
  size = model.clip.config.vision_config.image_size
  frames, classes = model.temporal_net.num_frames, model.dfer_config.num_classes
  out = []
  for i in range(NUM_BATCHES):
    g = torch.Generator(device=device).manual_seed(i)
    video = torch.randint(
      0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, device=device, generator=g
    )
    labels = torch.randint(0, classes, (batch,), device=device, generator=g)
    out.append((video, labels))
  return out


def time_steps(step, batches, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
  """train_step's protocol: first step (compile_s), warmup - 1 more, `steps` timed one by one with
  a synchronisation each, `steps` back to back with one synchronisation."""
  n = max(warmup, 1) + 2 * steps
  order = iter(batches[i % len(batches)] for i in range(n))
  t = time.perf_counter()
  step(*next(order))
  _sync(device)
  out: dict[str, Any] = {"compile_s": time.perf_counter() - t}
  for _ in range(max(warmup, 1) - 1):
    step(*next(order))
    _sync(device)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step(*next(order))
    _sync(device)
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    loss, accuracy = step(*next(order))
  _sync(device)
  pipelined = (time.perf_counter() - t) / steps
  ms = np.asarray(times) * 1e3
  out.update(
    {
      "step_ms_p50": float(np.percentile(ms, 50)),
      "step_ms_p90": float(np.percentile(ms, 90)),
      "step_ms_min": float(ms.min()),
      "step_ms_mean": float(ms.mean()),
      "step_ms_pipelined": pipelined * 1e3,
    }
  )
  metrics = {"loss": float(loss), "accuracy": float(accuracy)}
  out["last_metrics"] = metrics
  if not all(math.isfinite(v) for v in metrics.values()):
    raise FloatingPointError(f"non-finite training metrics {metrics}")
  return out


# ----------------------------------------------------------------------------------------------
# The record


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _versions() -> dict[str, Any]:
  cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
  return {
    "torch_version": torch.__version__,
    "transformers_version": transformers.__version__,
    "triton_version": _version("triton"),
    "cuda_version": torch.version.cuda,
    "cudnn_version": cudnn,
    "python_version": platform.python_version(),
  }


def _memory(device: torch.device) -> dict[str, float | None]:
  if device.type != "cuda":
    return {"peak_memory_gb": None, "peak_memory_reserved_gb": None}
  return {
    "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
    "peak_memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
  }


def _config_record(
  model: DFERCLIP, args: argparse.Namespace, dtype: str, precision: str
) -> dict[str, Any]:
  """The keys of train_step's `config`, for the same comparison table."""
  c, d = clip_config_of(model.clip.config), model.dfer_config
  return {
    "variant": args.variant,
    "mode": "train",
    "frames": args.frames,
    "batch": args.batch,
    "dtype": dtype,
    "remat": "none",
    "attention": "sdpa",
    "matmul_precision": precision,
    "image_size": c.vision.image_size,
    "patch_size": c.vision.patch_size,
    "vision_width": c.vision.width,
    "vision_layers": c.vision.layers,
    "text_width": c.text.width,
    "text_layers": c.text.layers,
    "embed_dim": c.embed_dim,
    "num_classes": d.num_classes,
    "n_ctx": d.n_ctx,
    "temporal_depth": d.temporal_depth,
    "optimizer": "sgd",
    "framework": "torch",
    "impl": args.impl,
    "clip_dir": args.clip_dir or None,
    "attn_implementation": getattr(model.clip.config, "_attn_implementation", None),
  }


def _device(name: str) -> torch.device:
  if name == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return torch.device(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds and times one configuration; returns the JSON record (never raises)."""
  device = _device(args.device)
  bf16 = args.impl != "fp32"
  dtype = "bfloat16" if bf16 else "float32"
  precision = "default" if bf16 else "highest"  # fp32: TF32 off (set_precision)
  platform_name = device.type
  kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  arithmetic = arithmetic_of(dtype, precision, platform_name)
  chip, peak = peak_tflops(kind, arithmetic)
  record: dict[str, Any] = {
    "benchmark": "benchmarks/torch_step.py",
    "framework": "torch",
    "impl": args.impl,
    "status": "ok",
    "device_kind": kind,
    "device_count": 1,
    "platform": platform_name,
    **_versions(),
    "arithmetic": arithmetic,
    "tf32": False,
    "peak_chip": chip,
    "peak_tflops": peak,
    "variant": args.variant if not args.clip_dir else "custom",
    "mode": "train",
    "frames": args.frames,
    "batch": args.batch,
    "dtype": dtype,
    "remat": "none",
    "attention": "sdpa",
    "attention_used": "sdpa",
    "matmul_precision": precision,
    "batch_per_device": args.batch,
    "microbatches": 1,
    "compile_mode": args.compile_mode if args.impl == "bf16-compile" else None,
    # XLA's own counts have no torch counterpart (the table shows "-").
    "xla_tflops_per_step": None,
    "xla_over_analytic": None,
  }
  model = optimizer = batches = None
  try:
    record.update(set_precision(args.impl))
    if device.type == "cuda":
      record["bytes_limit_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
      torch.cuda.reset_peak_memory_stats(device)
    else:
      record["bytes_limit_gb"] = None
    t = time.perf_counter()
    model = build(
      variant=args.variant,
      clip_dir=args.clip_dir or None,
      frames=args.frames,
      device=device,
      workdir=args.workdir or None,
      seed=args.seed,
    )
    record["build_s"] = time.perf_counter() - t
    record["config"] = _config_record(model, args, dtype, precision)
    err = record["text_path_check_max_abs_err"] = check_text_path(model)
    if err is not None and err > 1e-3:  # features are O(1): this is a different computation
      raise ValueError(
        f"the prompt path disagrees with transformers' own text tower by {err} "
        f"(transformers {transformers.__version__}): see `encode_prompts`"
      )
    counts = flops(model, args.batch)
    record["analytic_tflops_per_step"] = counts["total"] / 1e12
    record["analytic_tflops_breakdown"] = {k: v / 1e12 for k, v in counts.items() if k != "total"}
    record["model_tflops_per_step"] = counts["total"] / 1e12
    record["params_trained"] = sum(p.numel() for g in model.param_groups() for p in g["params"])
    optimizer = make_optimizer(model)
    step = make_train_step(model, optimizer, args.impl, args.compile_mode)
    batches = make_batches(model, args.batch, device)
    record.update(time_steps(step, batches, device, args.warmup, args.steps))
    step_s = record["step_ms_pipelined"] / 1e3
    record["clips_per_s"] = args.batch / step_s
    record["frames_per_s"] = args.batch * args.frames / step_s
    record["achieved_tflops"] = record["model_tflops_per_step"] / step_s
    record["mfu"] = None if peak is None else record["achieved_tflops"] / peak
    record.update(_memory(device))
  except Exception as err:  # pylint: disable=broad-except
    record["status"] = "oom" if is_oom(err) else "error"
    record["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
    record["traceback"] = traceback.format_exc()[-4000:]
    record.update(_memory(device))
  finally:
    del model, optimizer, batches
    gc.collect()
    if device.type == "cuda":
      torch.cuda.empty_cache()
  return record


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--variant", default="B/32", choices=VARIANTS, help="CLIP size (random init)")
  p.add_argument(
    "--clip_dir",
    default="",
    help="a local Hugging Face CLIP folder instead of a random-init --variant",
  )
  p.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
  p.add_argument("--batch", type=int, default=48, help="batch of clips")
  p.add_argument(
    "--impl",
    default="fp32",
    choices=IMPLS,
    help="fp32 (the authors': float32, eager, TF32 off), bf16 (autocast), "
    "bf16-compile (autocast under torch.compile)",
  )
  p.add_argument(
    "--compile_mode",
    default="default",
    choices=("default", "reduce-overhead", "max-autotune"),
    help="torch.compile mode of --impl=bf16-compile",
  )
  p.add_argument("--steps", type=int, default=20, help="timed steps (each of the two loops)")
  p.add_argument(
    "--warmup", type=int, default=3, help="untimed steps, the first (compile_s) included"
  )
  p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="", help="write the record here")
  p.add_argument(
    "--workdir",
    default="",
    help="folder for the demo tokenizer (reused across runs); default: a temp dir",
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit("--steps must be >= 1 and --warmup >= 0")
  return report.emit(run(args), args.json)


if __name__ == "__main__":
  sys.exit(main())
