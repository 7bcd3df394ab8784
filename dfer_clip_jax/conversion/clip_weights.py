"""Strict conversion of CLIP checkpoints into `dfer_clip_jax.models.clip.CLIP`.

Formats:
- OpenAI / OpenCLIP names (`visual.conv1.weight`, fused `attn.in_proj_weight` = [q; k; v], ...):
  `openai_to_params`. The config is inferred from the tensor shapes, as OpenAI's `build_model` does.
- Hugging Face `CLIPModel` names (`vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...):
  `hf_to_openai` renames them to OpenAI names (fusing q/k/v), then the OpenAI path applies. One
  path into the model means one place where transposes can go wrong.

Overlays: a second file of OpenAI-named tensors whose tensors replace the checkpoint's of the
same name (FaRL releases its face-pretrained ViT-B/16 this way: the CLIP tensors it trained, under
a `state_dict` key, beside keys of its own); `overlay_state` says what it replaced, ignored, kept.

Every function here is pure and strict: each source key is used or explicitly ignored, each target
parameter is filled, and shapes must agree; otherwise a `CheckpointMismatchError` names the keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dfer_clip_jax.conversion import hub
from dfer_clip_jax.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# Source keys that carry no weights we use (explicitly ignored, never silently dropped).
OPENAI_IGNORED = ("input_resolution", "context_length", "vocab_size")
HF_IGNORED_PATTERNS = (
  r"text_model\.embeddings\.position_ids",
  r"vision_model\.embeddings\.position_ids",
)


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not match the model: lists every offending key."""


def _error(what: str, problems: Mapping[str, list[str]]) -> CheckpointMismatchError:
  lines = [f"{what}:"]
  for kind, keys in problems.items():
    if keys:
      shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
      lines.append(f"  {kind}: {shown}")
  return CheckpointMismatchError("\n".join(lines))


def _count_blocks(state: Mapping[str, Any], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise CheckpointMismatchError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(idx)}")
  return len(idx)


def _get(state: Mapping[str, Any], key: str) -> np.ndarray:
  if key not in state:
    raise CheckpointMismatchError(f"checkpoint has no tensor {key!r}")
  return np.asarray(state[key])


def config_from_openai(
  state: Mapping[str, Any], *, act: str = "quick_gelu", eps: float = 1e-5
) -> CLIPConfig:
  """Infers a CLIPConfig from OpenAI-named tensors (as OpenAI's `build_model`). Head counts are
  width // 64 (OpenAI's rule); the activation can't be seen in the tensors (OpenCLIP's
  LAION models use `gelu`), so it is an argument."""
  if "visual.layer1.0.conv1.weight" in state:
    raise CheckpointMismatchError(
      "ResNet (ModifiedResNet) CLIP image towers are not supported: only ViT checkpoints"
    )
  conv = _get(state, "visual.conv1.weight")  # (W, 3, p, p)
  vwidth, _, patch, _ = conv.shape
  grid = round((_get(state, "visual.positional_embedding").shape[0] - 1) ** 0.5)
  vision = CLIPVisionConfig(
    width=vwidth,
    layers=_count_blocks(state, "visual.transformer.resblocks."),
    heads=max(vwidth // 64, 1),
    mlp_dim=_get(state, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
    patch_size=patch,
    image_size=patch * grid,
    act=act,
    eps=eps,
  )
  twidth = _get(state, "ln_final.weight").shape[0]
  text = CLIPTextConfig(
    width=twidth,
    layers=_count_blocks(state, "transformer.resblocks."),
    heads=max(twidth // 64, 1),
    mlp_dim=_get(state, "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
    context_length=_get(state, "positional_embedding").shape[0],
    vocab_size=_get(state, "token_embedding.weight").shape[0],
    act=act,
    eps=eps,
  )
  return CLIPConfig(vision=vision, text=text, embed_dim=_get(state, "text_projection").shape[1])


def _block_map(src: str, dst: str) -> dict[str, tuple[str, str]]:
  """OpenAI block tensor names -> (our dotted name, transform)."""
  return {
    f"{src}.ln_1.weight": (f"{dst}.ln_1.norm.scale", "id"),
    f"{src}.ln_1.bias": (f"{dst}.ln_1.norm.bias", "id"),
    f"{src}.attn.in_proj_weight": (f"{dst}.attn.in_proj.kernel", "T"),
    f"{src}.attn.in_proj_bias": (f"{dst}.attn.in_proj.bias", "id"),
    f"{src}.attn.out_proj.weight": (f"{dst}.attn.out_proj.kernel", "T"),
    f"{src}.attn.out_proj.bias": (f"{dst}.attn.out_proj.bias", "id"),
    f"{src}.ln_2.weight": (f"{dst}.ln_2.norm.scale", "id"),
    f"{src}.ln_2.bias": (f"{dst}.ln_2.norm.bias", "id"),
    f"{src}.mlp.c_fc.weight": (f"{dst}.mlp.c_fc.kernel", "T"),
    f"{src}.mlp.c_fc.bias": (f"{dst}.mlp.c_fc.bias", "id"),
    f"{src}.mlp.c_proj.weight": (f"{dst}.mlp.c_proj.kernel", "T"),
    f"{src}.mlp.c_proj.bias": (f"{dst}.mlp.c_proj.bias", "id"),
  }


def openai_key_map(config: CLIPConfig) -> dict[str, tuple[str, str]]:
  """OpenAI state-dict name -> (our dotted parameter name, transform)."""
  m = {
    "visual.conv1.weight": ("visual.conv1.kernel", "OIHW->HWIO"),
    "visual.class_embedding": ("visual.class_embedding", "id"),
    "visual.positional_embedding": ("visual.positional_embedding", "posemb"),
    "visual.ln_pre.weight": ("visual.ln_pre.norm.scale", "id"),
    "visual.ln_pre.bias": ("visual.ln_pre.norm.bias", "id"),
    "visual.ln_post.weight": ("visual.ln_post.norm.scale", "id"),
    "visual.ln_post.bias": ("visual.ln_post.norm.bias", "id"),
    "visual.proj": ("visual.proj", "id"),
    "token_embedding.weight": ("text.token_embedding.embedding", "id"),
    "positional_embedding": ("text.positional_embedding", "id"),
    "ln_final.weight": ("text.ln_final.norm.scale", "id"),
    "ln_final.bias": ("text.ln_final.norm.bias", "id"),
    "text_projection": ("text.text_projection", "id"),
    "logit_scale": ("logit_scale", "id"),
  }
  for i in range(config.vision.layers):
    m.update(_block_map(f"visual.transformer.resblocks.{i}", f"visual.transformer.resblocks.{i}"))
  for i in range(config.text.layers):
    m.update(_block_map(f"transformer.resblocks.{i}", f"text.transformer.resblocks.{i}"))
  return m


def _cubic_weights_OxI(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of PyTorch's bicubic resize along one axis: Keys'
  cubic with a = -0.75, half-pixel centres (align_corners=False), edge samples repeated, no
  antialiasing."""
  a = -0.75

  def kernel(t):
    t = np.abs(t)
    return np.where(
      t <= 1,
      ((a + 2) * t - (a + 3)) * t * t + 1,
      np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    )

  src_O = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base_O = np.floor(src_O).astype(int)
  w_OxI = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    idx_O = np.clip(base_O + k, 0, n_in - 1)
    np.add.at(w_OxI, (np.arange(n_out), idx_O), kernel(src_O - (base_O + k)))
  return w_OxI


def resample_posemb(posemb_PxW: np.ndarray, new_grid: int | tuple[int, int]) -> np.ndarray:
  """Bicubic resampling of a ViT position embedding to a new patch grid (rows, columns; an int
  for a square grid), class token kept. The interpolation is PyTorch's bicubic
  (align_corners=False), the one OpenCLIP and timm use when they change a CLIP's resolution."""
  cls_1xW, grid_PxW = posemb_PxW[:1], np.asarray(posemb_PxW[1:], np.float64)
  old_grid = round(grid_PxW.shape[0] ** 0.5)
  if old_grid * old_grid != grid_PxW.shape[0]:
    raise CheckpointMismatchError(
      f"position embedding with {grid_PxW.shape[0]} patch rows is not a square grid"
    )
  rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  width = grid_PxW.shape[1]
  grid_GxGxW = grid_PxW.reshape(old_grid, old_grid, width)  # row-major patches: (row, col)
  new_RxCxW = np.einsum(
    "rg,gkw,ck->rcw",
    _cubic_weights_OxI(rows, old_grid),
    grid_GxGxW,
    _cubic_weights_OxI(cols, old_grid),
  )
  return np.concatenate([cls_1xW, new_RxCxW.reshape(-1, width).astype(posemb_PxW.dtype)], axis=0)


def openai_to_params(
  state: Mapping[str, Any], config: CLIPConfig, *, ignore: tuple[str, ...] = OPENAI_IGNORED
) -> dict[str, np.ndarray]:
  """OpenAI-named tensors -> our flat parameters {dotted name: float32 array}. Strict."""
  key_map = openai_key_map(config)
  unused = sorted(k for k in state if k not in key_map and k not in ignore)
  missing = sorted(k for k in key_map if k not in state)
  if unused or missing:
    raise _error(
      "OpenAI-format CLIP checkpoint does not match the model",
      {"missing tensors": missing, "unexpected tensors": unused},
    )
  out = {}
  for src, (dst, how) in key_map.items():
    x = np.asarray(state[src], dtype=np.float32)
    if how == "T":
      x = x.T
    elif how == "OIHW->HWIO":
      x = x.transpose(2, 3, 1, 0)
    elif how == "posemb" and x.shape[0] != config.vision.grid**2 + 1:
      x = resample_posemb(x, config.vision.grid)
    out[dst] = x
  return out


def config_from_hf(
  config_json: Mapping[str, Any], state: Mapping[str, Any] | None = None
) -> CLIPConfig:
  """CLIPConfig from a Hugging Face `config.json` dict (missing fields take transformers'
  defaults). The projection width comes from the weights when given: `text_config.projection_dim`
  may disagree with the real projection."""
  from transformers import CLIPConfig as HFCLIPConfig  # pylint: disable=g-import-not-at-top

  hf = HFCLIPConfig.from_dict(dict(config_json))
  v, t = hf.vision_config, hf.text_config

  def act(name: str) -> str:
    known = {
      "quick_gelu": "quick_gelu",
      "gelu": "gelu",
      "gelu_new": "gelu_tanh",
      "gelu_pytorch_tanh": "gelu_tanh",
    }
    if name not in known:
      raise CheckpointMismatchError(f"unsupported hidden_act {name!r} in config.json")
    return known[name]

  embed_dim = hf.projection_dim
  if state is not None and "visual_projection.weight" in state:
    embed_dim = np.asarray(state["visual_projection.weight"]).shape[0]
  return CLIPConfig(
    vision=CLIPVisionConfig(
      width=v.hidden_size,
      layers=v.num_hidden_layers,
      heads=v.num_attention_heads,
      mlp_dim=v.intermediate_size,
      patch_size=v.patch_size,
      image_size=v.image_size,
      act=act(v.hidden_act),
      eps=v.layer_norm_eps,
    ),
    text=CLIPTextConfig(
      width=t.hidden_size,
      layers=t.num_hidden_layers,
      heads=t.num_attention_heads,
      mlp_dim=t.intermediate_size,
      context_length=t.max_position_embeddings,
      vocab_size=t.vocab_size,
      act=act(t.hidden_act),
      eps=t.layer_norm_eps,
    ),
    embed_dim=embed_dim,
    logit_scale_init=float(hf.logit_scale_init_value),
  )


def hf_to_openai(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Hugging Face CLIPModel names -> OpenAI names (q/k/v fused into `in_proj`). Strict."""
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()

  def take(key: str) -> np.ndarray:
    used.add(key)
    return np.asarray(_get(state, key))

  simple = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
  }
  for src, dst in simple.items():
    out[dst] = take(src)
  # HF projections are bias-free Linear layers (out, in); OpenAI's are (in, out) matrices.
  out["visual.proj"] = take("visual_projection.weight").T
  out["text_projection"] = take("text_projection.weight").T
  for hf_tower, oa_prefix in (
    ("vision_model", "visual.transformer.resblocks"),
    ("text_model", "transformer.resblocks"),
  ):
    for i in range(_count_blocks(state, f"{hf_tower}.encoder.layers.")):
      src, dst = f"{hf_tower}.encoder.layers.{i}", f"{oa_prefix}.{i}"
      out[f"{dst}.attn.in_proj_weight"] = np.concatenate(
        [take(f"{src}.self_attn.{n}_proj.weight") for n in "qkv"], axis=0
      )
      out[f"{dst}.attn.in_proj_bias"] = np.concatenate(
        [take(f"{src}.self_attn.{n}_proj.bias") for n in "qkv"], axis=0
      )
      for a, b in (
        ("self_attn.out_proj", "attn.out_proj"),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
      ):
        out[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight")
        out[f"{dst}.{b}.bias"] = take(f"{src}.{a}.bias")
  ignored = [k for k in state if any(re.fullmatch(p, k) for p in HF_IGNORED_PATTERNS)]
  unused = sorted(set(state) - used - set(ignored))
  if unused:
    raise _error(
      "Hugging Face CLIP checkpoint has tensors the converter does not know",
      {"unexpected tensors": unused},
    )
  return out


def is_hf_naming(state: Mapping[str, Any]) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def assign_params(abstract_model: CLIP, params: Mapping[str, np.ndarray], *, dtype=None) -> CLIP:
  """Fills an abstract (eval_shape) model with converted parameters. Strict on names and shapes."""
  graphdef, state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(state))
  target = {".".join(str(p) for p in path): path for path in flat}
  missing = sorted(set(target) - set(params))
  unexpected = sorted(set(params) - set(target))
  wrong = sorted(
    f"{k}: checkpoint {tuple(params[k].shape)} vs model {tuple(flat[target[k]].shape)}"
    for k in set(target) & set(params)
    if tuple(params[k].shape) != tuple(flat[target[k]].shape)
  )
  if missing or unexpected or wrong:
    raise _error(
      "converted parameters do not fit the model",
      {"parameters not filled": missing, "unknown parameters": unexpected, "shape mismatch": wrong},
    )
  new_flat = []
  for name, path in target.items():
    var = flat[path]
    new_flat.append((path, var.replace(jnp.asarray(params[name], dtype or var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  # torch_io reads every format (safetensors, npz, torch zip, TorchScript) without torch and
  # without executing code from the file.
  from dfer_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top

  tensors, _ = torch_io.load_state_dict(path)
  return tensors


def _load_hf_folder(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face CLIP folder")
  config_json = json.loads(config_path.read_text())
  for name in ("model.safetensors", "pytorch_model.bin"):
    if (folder / name).is_file():
      return _read_tensors(folder / name), config_json
  shards = sorted(folder.glob("model-*-of-*.safetensors"))
  if shards:
    state: dict[str, np.ndarray] = {}
    for shard in shards:
      state.update(_read_tensors(shard))
    return state, config_json
  raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")


def _strip_hf_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Some exports prefix every key with `model.` or `clip.`; accept that unambiguous case."""
  for prefix in ("model.", "clip."):
    if state and all(k.startswith(prefix) for k in state):
      return {k[len(prefix) :]: v for k, v in state.items()}
  return dict(state)


@dataclasses.dataclass(frozen=True)
class OverlayReport:
  """What an overlay did: its tensors that replaced the checkpoint's (`replaced`), its keys that
  name no checkpoint tensor (`ignored`: not CLIP tensors) and the checkpoint's tensors it left
  as they were (`kept`)."""

  replaced: tuple[str, ...]
  ignored: tuple[str, ...]
  kept: tuple[str, ...]

  def summary(self) -> str:
    return (
      f"{len(self.replaced)} tensors replaced, {len(self.ignored)} overlay keys ignored "
      f"(not CLIP tensors), {len(self.kept)} checkpoint tensors kept"
    )


def overlay_state(
  base: Mapping[str, Any], overlay: Mapping[str, Any], *, where: str = "overlay"
) -> tuple[dict[str, Any], OverlayReport]:
  """The OpenAI-named `base` with every tensor that `overlay` also names replaced by the overlay's.

  The matching is by exact name and deliberately not strict in the overlay's direction (its other
  keys, e.g. a pretraining head, are ignored and reported); a shape mismatch is an error naming
  the tensor, and so is an overlay that names no tensor of the base (wrong naming or prefixes).
  """
  replaced = tuple(k for k in overlay if k in base)
  ignored = tuple(k for k in overlay if k not in base)
  wrong = [
    f"{k}: overlay {tuple(np.shape(overlay[k]))} vs checkpoint {tuple(np.shape(base[k]))}"
    for k in replaced
    if tuple(np.shape(overlay[k])) != tuple(np.shape(base[k]))
  ]
  if wrong:
    raise _error(f"{where}: tensors do not fit the checkpoint", {"shape mismatch": wrong})
  if not replaced:
    raise CheckpointMismatchError(
      f"{where}: none of its {len(overlay)} keys names a tensor of the checkpoint (expected "
      f"OpenAI CLIP names such as 'visual.conv1.weight'; its first keys: {list(overlay)[:5]})"
    )
  merged = dict(base)
  merged.update((k, overlay[k]) for k in replaced)
  kept = tuple(k for k in base if k not in overlay)
  return merged, OverlayReport(replaced, ignored, kept)


def load_clip(
  source: str | os.PathLike | Mapping[str, Any],
  *,
  dtype=jnp.float32,
  act: str | None = None,
  image_size: int | None = None,
  attention_impl: str = "xla",
  remat: bool | str = "none",
  config_json: Mapping[str, Any] | None = None,
  overlay: str | os.PathLike | Mapping[str, Any] | None = None,
) -> tuple[CLIP, CLIPConfig]:
  """Loads a CLIP checkpoint into our NNX model.

  Args:
    source: a Hugging Face CLIP folder (`config.json` + `model.safetensors` or
      `pytorch_model.bin`) or Hub id (`openai/clip-vit-base-patch32`, see `hub.resolve`), an OpenAI/OpenCLIP checkpoint file (TorchScript archive such as
      `ViT-B-32.pt`, or a plain state-dict `.pt/.pth/.bin/.safetensors/.npz`), or an in-memory
      mapping of names to arrays in either naming.
    dtype: compute dtype (parameters stay float32).
    act: activation override for OpenAI-named weights, whose tensors don't record it
      (`quick_gelu` for OpenAI's models, `gelu` for OpenCLIP's LAION models).
    image_size: input resolution; the position embedding is resampled if it differs.
    attention_impl: `auto` (cuDNN on GPUs in half precision when possible), `xla`, `cudnn`
      or `plain`.
    remat: what the image tower recomputes in the backward pass (`clip.remat_mode`).
    config_json: a HF `config.json` dict for an in-memory mapping in HF naming.
    overlay: a file (or mapping) of OpenAI-named tensors replacing the checkpoint's of the same
      name (`overlay_state`; e.g. FaRL's weights over OpenAI's ViT-B/16); what it replaced,
      ignored and kept is logged.

  Returns:
    (model, config).
  """
  if isinstance(source, Mapping):
    state, cfg_json = _strip_hf_prefix(source), config_json
  else:
    path = hub.resolve(source)
    if path.is_dir():
      state, cfg_json = _load_hf_folder(path)
      state = _strip_hf_prefix(state)
    elif path.is_file():
      state, cfg_json = _strip_hf_prefix(_read_tensors(path)), config_json
    else:
      raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
  if is_hf_naming(state):
    if cfg_json is None:
      raise ValueError(
        "Hugging Face-named CLIP weights need their config.json (pass a folder or config_json=...)"
      )
    config = config_from_hf(cfg_json, state)
    if act is not None:
      config = config.replace(
        vision=dataclasses.replace(config.vision, act=act),
        text=dataclasses.replace(config.text, act=act),
      )
    state = hf_to_openai(state)
  else:
    config = config_from_openai(state, act=act or "quick_gelu")
  if overlay is not None:
    where = "overlay" if isinstance(overlay, Mapping) else f"overlay {overlay}"
    tensors = overlay if isinstance(overlay, Mapping) else _read_tensors(pathlib.Path(overlay))
    state, report = overlay_state(state, tensors, where=where)
    logging.info("CLIP %s: %s", where, report.summary())
  if image_size is not None and image_size != config.vision.image_size:
    if image_size % config.vision.patch_size:
      raise ValueError(
        f"image_size {image_size} is not a multiple of the patch size {config.vision.patch_size}"
      )
    config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
  params = openai_to_params(state, config)
  abstract = nnx.eval_shape(
    lambda: CLIP(config, dtype=dtype, attention_impl=attention_impl, remat=remat, rngs=nnx.Rngs(0))
  )
  return assign_params(abstract, params), config


def params_to_openai(model: CLIP) -> dict[str, np.ndarray]:
  """Our CLIP's parameters under OpenAI state-dict names (the inverse of `openai_to_params`),
  e.g. to export a fine-tuned image tower for PyTorch tools."""
  flat = {
    ".".join(str(p) for p in path): np.asarray(v.get_value())
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  out = {}
  for src, (dst, how) in openai_key_map(model.config).items():
    x = flat[dst]
    if how == "T":
      x = x.T
    elif how == "OIHW->HWIO":
      x = x.transpose(3, 2, 0, 1)
    out[src] = np.ascontiguousarray(x) if x.ndim else x
  return out
