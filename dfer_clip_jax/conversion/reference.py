"""Import of the reference DFER-CLIP (PyTorch) checkpoints, and export of our models.

A reference checkpoint is the state dict of its `GenerateModel` (names below without the
`module.` prefix that its DataParallel checkpoints add):
  image_encoder.*               the CLIP image tower, OpenAI `visual.*` names
  text_encoder.*                the text tower: transformer.resblocks.*, positional_embedding,
                                ln_final.*, text_projection (OpenAI names without a prefix)
  clip_model_.*                 the whole CLIP again: `clip_model_.visual.X` duplicates
                                `image_encoder.X` and `clip_model_.X` duplicates `text_encoder.X`
                                (checked equal, then ignored); only here: token_embedding.weight
                                and logit_scale (both loaded into our frozen CLIP)
  prompt_learner.ctx            (C, M, W) class-specific or (M, W) shared context
  prompt_learner.token_prefix   (C, 1, W), token_suffix (C, L - 1 - M, W): prompt embeddings
  temporal_net.*                cls_token (1, 1, D), pos_embedding (1, T + 1, D),
                                temporal_transformer.layers.{i}.{0,1}.fn.* (see `_temporal_map`)

Everything is inferred from the tensors: classes, context length, class-specific or shared,
temporal depth / MLP width / frames, the CLIP sizes, and the end-of-text position of each prompt
(from `token_ids` when given, else as the first suffix row equal to the token embedding of the
end token 49407). What the tensors cannot tell is an argument: the class-text position (`end`
by default), the temporal head split (heads x 64, the reference's), the CLIP activation.

Files are read by `torch_io`, which rebuilds tensors without executing code from the pickle and
stubs the reference's pickled `recorder` object (reported in `ImportReport.stubbed_classes`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfer_clip_jax.conversion import clip_weights
from dfer_clip_jax.conversion.clip_weights import CheckpointMismatchError
from dfer_clip_jax.data import datasets
from dfer_clip_jax.models.clip import CLIP, CLIPConfig
from dfer_clip_jax.models.dfer_clip import DFERCLIP, DFERCLIPConfig
from dfer_clip_jax.models.prompts import PromptBuffer, PromptBuffers
from dfer_clip_jax.tokenizer import END_OF_TEXT

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "dfer_clip_jax.export/1"

_TEMPORAL = "temporal_net.temporal_transformer.layers."


@dataclasses.dataclass
class ImportReport:
  """What the import found besides the weights.

  Attributes:
    source: the file (or "<mapping>").
    stubbed_classes: classes of the pickle replaced by inert stubs (e.g. the reference's
      `utils.RecorderMeter`); nothing from the file was imported or run.
    metadata: scalars stored next to the weights (`epoch`, `best_acc`).
    ignored: source keys not loaded, each with the reason.
    warnings: things the user should know (e.g. a degenerate depth-0 reference model).
  """

  source: str
  stubbed_classes: list[str] = dataclasses.field(default_factory=list)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  warnings: list[str] = dataclasses.field(default_factory=list)


class ImportedReference(NamedTuple):
  model: DFERCLIP
  config: DFERCLIPConfig
  clip_config: CLIPConfig
  report: ImportReport


def _temporal_map(depth: int) -> dict[str, tuple[str, str]]:
  m = {
    "temporal_net.cls_token": ("temporal_net.cls_token", "id"),
    "temporal_net.pos_embedding": ("temporal_net.pos_embedding", "id"),
  }
  for i in range(depth):
    src, dst = f"{_TEMPORAL}{i}", f"{_TEMPORAL}{i}"
    m.update(
      {
        f"{src}.0.fn.norm.weight": (f"{dst}.attn.norm.scale", "id"),
        f"{src}.0.fn.norm.bias": (f"{dst}.attn.norm.bias", "id"),
        f"{src}.0.fn.fn.to_qkv.weight": (f"{dst}.attn.to_qkv.kernel", "T"),
        f"{src}.0.fn.fn.to_out.0.weight": (f"{dst}.attn.to_out.kernel", "T"),
        f"{src}.0.fn.fn.to_out.0.bias": (f"{dst}.attn.to_out.bias", "id"),
        f"{src}.1.fn.norm.weight": (f"{dst}.ff.norm.scale", "id"),
        f"{src}.1.fn.norm.bias": (f"{dst}.ff.norm.bias", "id"),
        f"{src}.1.fn.fn.net.0.weight": (f"{dst}.ff.fc1.kernel", "T"),
        f"{src}.1.fn.fn.net.0.bias": (f"{dst}.ff.fc1.bias", "id"),
        f"{src}.1.fn.fn.net.3.weight": (f"{dst}.ff.fc2.kernel", "T"),
        f"{src}.1.fn.fn.net.3.bias": (f"{dst}.ff.fc2.bias", "id"),
      }
    )
  return m


def _openai_name(ref: str) -> str | None:
  """Reference CLIP tensor name -> OpenAI name (None for non-CLIP keys)."""
  if ref.startswith("image_encoder."):
    return "visual." + ref[len("image_encoder.") :]
  if ref.startswith("text_encoder."):
    return ref[len("text_encoder.") :]
  if ref in ("clip_model_.token_embedding.weight", "clip_model_.logit_scale"):
    return ref[len("clip_model_.") :]
  return None


def reference_key_map(
  config: DFERCLIPConfig, clip_config: CLIPConfig
) -> dict[str, tuple[str, str]]:
  """Reference tensor name -> (our dotted name, transform: "id", "T" or "OIHW->HWIO").

  Covers every tensor loaded (not the `clip_model_.*` duplicates, which are checked and ignored).
  """
  m: dict[str, tuple[str, str]] = {}
  for oa_name, (ours, how) in clip_weights.openai_key_map(clip_config).items():
    if oa_name.startswith("visual."):
      ref = "image_encoder." + oa_name[len("visual.") :]
    elif oa_name in ("token_embedding.weight", "logit_scale"):
      ref = "clip_model_." + oa_name
    else:
      ref = "text_encoder." + oa_name
    m[ref] = ("clip." + ours, "id" if how == "posemb" else how)
  if config.head == "prompt":
    if config.n_ctx:
      m["prompt_learner.ctx"] = ("prompt_learner.ctx", "id")
    m["prompt_learner.token_prefix"] = ("prompt_learner.token_prefix", "id")
    m["prompt_learner.token_suffix"] = ("prompt_learner.token_suffix", "id")
  if config.temporal_depth > 0:
    m.update(_temporal_map(config.temporal_depth))
  return m


def to_reference_layout(x: np.ndarray, how: str) -> np.ndarray:
  """Inverse of the import transform: our array -> the reference's layout."""
  if how == "T":
    return np.asarray(x).T
  if how == "OIHW->HWIO":
    return np.asarray(x).transpose(3, 2, 0, 1)
  return np.asarray(x)


def _from_reference_layout(x: np.ndarray, how: str) -> np.ndarray:
  if how == "T":
    return x.T
  if how == "OIHW->HWIO":
    return x.transpose(2, 3, 1, 0)
  return x


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the DataParallel `module.` prefix (all keys or none carry it)."""
  prefixed = [k for k in state if k.startswith("module.")]
  if prefixed and len(prefixed) != len(state):
    others = [k for k in state if not k.startswith("module.")][:5]
    raise CheckpointMismatchError(
      f"some keys have the 'module.' prefix and some don't (e.g. {others})"
    )
  return {k[len("module.") :]: v for k, v in state.items()} if prefixed else dict(state)


def _count(state: Mapping[str, Any], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise CheckpointMismatchError(f"layers under {prefix!r} are not numbered 0..n-1: {sorted(idx)}")
  return len(idx)


def _need(state: Mapping[str, Any], key: str) -> np.ndarray:
  if key not in state:
    raise CheckpointMismatchError(
      f"reference checkpoint has no tensor {key!r}: not a DFER-CLIP "
      "checkpoint, or an unsupported variant"
    )
  return np.asarray(state[key])


def infer_reference_config(
  state: Mapping[str, Any],
  *,
  position: str = "end",
  token_ids: np.ndarray | None = None,
  temporal_dim_head: int = 64,
  clip_act: str = "quick_gelu",
  **config_overrides,
) -> tuple[DFERCLIPConfig, CLIPConfig, np.ndarray, list[str]]:
  """Infers (config, CLIP config, name_lens (C,), warnings) from prefix-free reference tensors.

  `config_overrides` set DFERCLIPConfig fields the tensors don't record (text_type,
  class_names, logit_scale, temporal_dropout, ...).
  """
  warn: list[str] = []
  openai = {oa: state[k] for k in state if (oa := _openai_name(k)) is not None}
  clip_config = clip_weights.config_from_openai(openai, act=clip_act)

  ctx = _need(state, "prompt_learner.ctx")
  prefix = _need(state, "prompt_learner.token_prefix")
  suffix = _need(state, "prompt_learner.token_suffix")
  if ctx.ndim == 3:
    class_specific, num_classes, n_ctx = True, ctx.shape[0], ctx.shape[1]
  elif ctx.ndim == 2:
    class_specific, num_classes, n_ctx = False, prefix.shape[0], ctx.shape[0]
  else:
    raise CheckpointMismatchError(
      f"prompt_learner.ctx has shape {ctx.shape}: expected (C, M, W) or (M, W)"
    )
  width = clip_config.text.width
  length = clip_config.text.context_length
  if (
    prefix.shape != (num_classes, 1, width)
    or suffix.shape != (num_classes, length - 1 - n_ctx, width)
    or ctx.shape[-1] != width
  ):
    raise CheckpointMismatchError(
      f"prompt tensors disagree with {num_classes} classes, {n_ctx} context tokens and text "
      f"width {width}, context {length}: ctx {ctx.shape}, token_prefix {prefix.shape}, "
      f"token_suffix {suffix.shape}"
    )

  name_lens = _name_lens(state, suffix, n_ctx, token_ids)

  depth = _count(state, _TEMPORAL)
  if depth == 0:
    num_frames = _need(state, "temporal_net.pos_embedding").shape[1] - 1
    warn.append(
      "the reference model has temporal depth 0: it maps every video to the same "
      "feature (cls + pos), which this port does not reproduce; imported as depth 0 = "
      "the mean of the frame features, cls_token / pos_embedding ignored"
    )
    mlp_dim, heads = 1024, 8
  else:
    pos = _need(state, "temporal_net.pos_embedding")
    num_frames = pos.shape[1] - 1
    if pos.shape[2] != clip_config.embed_dim:
      raise CheckpointMismatchError(
        f"temporal_net.pos_embedding {pos.shape} does not match the "
        f"CLIP embedding width {clip_config.embed_dim}"
      )
    inner = _need(state, f"{_TEMPORAL}0.0.fn.fn.to_qkv.weight").shape[0] // 3
    if inner % temporal_dim_head:
      raise CheckpointMismatchError(
        f"temporal attention width {inner} is not a multiple of "
        f"temporal_dim_head={temporal_dim_head}"
      )
    heads = inner // temporal_dim_head
    mlp_dim = _need(state, f"{_TEMPORAL}0.1.fn.fn.net.0.weight").shape[0]
  fields = dict(
    num_frames=num_frames,
    temporal_depth=depth,
    temporal_heads=heads,
    temporal_dim_head=temporal_dim_head,
    temporal_mlp_dim=mlp_dim,
    head="prompt",
    n_ctx=n_ctx,
    class_specific=class_specific,
    position=position,
  )
  clash = sorted(set(fields) & set(config_overrides))
  if clash:
    raise ValueError(f"{clash} are inferred from the checkpoint's tensors and cannot be overridden")
  fields.update(config_overrides)
  # The tensors don't name the classes: the emotions in the reference's label order (7 = DFEW /
  # FERV39k, 11 = MAFW) unless given.
  names = fields.setdefault("class_names", datasets.MAFW_CLASSES[:num_classes])
  if len(names) != num_classes:
    raise ValueError(f"class_names {names} do not match the checkpoint's {num_classes} classes")
  return DFERCLIPConfig(**fields), clip_config, name_lens, warn


def _name_lens(
  state: Mapping[str, Any], suffix_CxSxW: np.ndarray, n_ctx: int, token_ids: np.ndarray | None
) -> np.ndarray:
  """Class-text token counts from the end-of-text positions (eot = 1 + M + name_len)."""
  tok_emb = state.get("clip_model_.token_embedding.weight")
  c = suffix_CxSxW.shape[0]
  if token_ids is not None:
    ids_CxL = np.asarray(token_ids)
    if ids_CxL.shape != (c, 1 + n_ctx + suffix_CxSxW.shape[1]):
      raise ValueError(
        f"token_ids {ids_CxL.shape} do not match {c} prompts of "
        f"{1 + n_ctx + suffix_CxSxW.shape[1]} tokens"
      )
    eot_C = ids_CxL.argmax(axis=-1)  # first occurrence of the largest id
    if tok_emb is not None:
      expected = np.asarray(tok_emb, np.float32)[ids_CxL[:, 1 + n_ctx :]]
      if not np.array_equal(expected, np.asarray(suffix_CxSxW, np.float32)):
        raise CheckpointMismatchError(
          "token_ids do not produce the checkpoint's "
          "prompt_learner.token_suffix: not this model's prompts"
        )
  else:
    if tok_emb is None:
      raise CheckpointMismatchError(
        "no clip_model_.token_embedding.weight to find the end-of-text tokens with: pass token_ids"
      )
    end_W = np.asarray(tok_emb)[END_OF_TEXT]
    is_end_CxS = np.all(np.asarray(suffix_CxSxW) == end_W, axis=-1)
    missing = [i for i in range(c) if not is_end_CxS[i].any()]
    if missing:
      raise CheckpointMismatchError(
        f"prompts {missing} have no end-of-text token in "
        "prompt_learner.token_suffix: pass token_ids"
      )
    eot_C = 1 + n_ctx + is_end_CxS.argmax(axis=-1)
  name_lens_C = eot_C - 1 - n_ctx
  if (name_lens_C < 0).any():
    raise CheckpointMismatchError(
      f"end-of-text positions {eot_C.tolist()} fall inside the {n_ctx} context tokens"
    )
  return name_lens_C.astype(np.int32)


def reference_to_params(
  state: Mapping[str, Any],
  config: DFERCLIPConfig,
  clip_config: CLIPConfig,
  name_lens: np.ndarray,
  *,
  allow_stale_duplicates: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Prefix-free reference tensors -> ({our dotted name: array}, {ignored key: reason}). Strict:
  every key is loaded, a checked duplicate, or an explicitly ignored one."""
  key_map = reference_key_map(config, clip_config)
  ignored: dict[str, str] = {}
  unexpected, stale = [], []
  for key in state:
    if key in key_map:
      continue
    if key.startswith("clip_model_."):
      rest = key[len("clip_model_.") :]
      twin = (
        "image_encoder." + rest[len("visual.") :]
        if rest.startswith("visual.")
        else "text_encoder." + rest
      )
      if twin not in state:
        unexpected.append(key)
      elif not np.array_equal(np.asarray(state[key]), np.asarray(state[twin])):
        stale.append(key)
        ignored[key] = f"differs from {twin}, which the reference's forward uses"
      else:
        ignored[key] = f"duplicate of {twin}"
    elif config.temporal_depth == 0 and key in (
      "temporal_net.cls_token",
      "temporal_net.pos_embedding",
    ):
      ignored[key] = "unused: depth 0 is the frame mean here"
    else:
      unexpected.append(key)
  missing = sorted(k for k in key_map if k not in state)
  if missing or unexpected:
    raise clip_weights._error(  # pylint: disable=protected-access
      "reference checkpoint does not match the inferred DFER-CLIP model",
      {"missing tensors": missing, "unexpected tensors": sorted(unexpected)},
    )
  if stale and not allow_stale_duplicates:
    raise CheckpointMismatchError(
      f"{len(stale)} clip_model_.* tensors differ from the image_encoder / text_encoder "
      f"tensors the reference computes with (e.g. {stale[:3]}); pass "
      "allow_stale_duplicates=True to load the latter anyway"
    )
  params = {}
  for ref, (ours, how) in key_map.items():
    params[ours] = _from_reference_layout(np.asarray(state[ref], np.float32), how)
  if config.head == "prompt":
    params["prompt_learner.name_lens"] = np.asarray(name_lens, np.int32)
  return params, ignored


def _read_source(
  source: str | os.PathLike | Mapping[str, Any], report: ImportReport
) -> dict[str, Any]:
  if isinstance(source, Mapping):
    state = dict(source)
  else:
    from dfer_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(source)
    if not path.is_file():
      raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    state, load_report = torch_io.load_state_dict(path)
    report.stubbed_classes = list(load_report.stubbed_classes)
    report.metadata = dict(load_report.metadata)
    for key in load_report.ignored_keys:
      report.ignored[key] = "not weights (training-checkpoint entry)"
  # Arrays whose names start with '_' are fixture inputs/outputs stored beside the weights.
  for key in [k for k in state if k.startswith("_")]:
    report.ignored[key] = "not a weight ('_' prefix)"
    del state[key]
  return _strip_prefix(state)


def load_reference_checkpoint(
  source: str | os.PathLike | Mapping[str, Any],
  *,
  position: str = "end",
  token_ids: np.ndarray | None = None,
  temporal_dim_head: int = 64,
  clip_act: str = "quick_gelu",
  allow_stale_duplicates: bool = False,
  dtype=jnp.float32,
  attention_impl: str = "xla",
  remat: bool | str = "none",
  **config_overrides,
) -> ImportedReference:
  """Loads a reference DFER-CLIP checkpoint into our model.

  Args:
    source: a `.pth` / `.pt` file as the reference saves it ({'state_dict': {'module.…': …},
      'epoch', 'best_acc', 'optimizer', 'recorder'}), a plain state-dict file (torch, safetensors,
      `.npz`; arrays named `_…` are skipped), or an in-memory mapping of names to arrays.
    position: where the reference put the class text ("end" in all its scripts); not recorded
      in the tensors.
    token_ids: the reference's (C, 77) prompt token ids, to take end-of-text positions from
      (checked against the stored suffix embeddings); by default they are found in the suffix.
    temporal_dim_head: the temporal attention's head width (the reference: 64), to split its
      fused width into heads.
    clip_act: the CLIP towers' activation (OpenAI weights: quick_gelu).
    allow_stale_duplicates: load even if the `clip_model_.*` copies differ from the towers.
    dtype, attention_impl, remat: compute options of the model.
    **config_overrides: DFERCLIPConfig fields the tensors don't record (text_type,
      class_names, logit_scale, temporal_dropout, ...).

  Returns:
    (model, config, clip_config, report).
  """
  report = ImportReport(source="<mapping>" if isinstance(source, Mapping) else os.fspath(source))
  state = _read_source(source, report)
  config, clip_config, name_lens, warn = infer_reference_config(
    state,
    position=position,
    token_ids=token_ids,
    temporal_dim_head=temporal_dim_head,
    clip_act=clip_act,
    **config_overrides,
  )
  params, ignored = reference_to_params(
    state, config, clip_config, name_lens, allow_stale_duplicates=allow_stale_duplicates
  )
  report.ignored.update(ignored)
  report.warnings.extend(warn)
  stale = [k for k, why in ignored.items() if why.startswith("differs")]
  if stale:
    report.warnings.append(
      f"{len(stale)} clip_model_.* tensors differ from the towers' tensors "
      "(the towers' were loaded)"
    )
  for w in report.warnings:
    warnings.warn(w, stacklevel=2)
  model = build_model(
    config, clip_config, params, dtype=dtype, attention_impl=attention_impl, remat=remat
  )
  logging.info(
    "imported reference DFER-CLIP from %s: %d classes, %d context tokens (%s), "
    "temporal depth %d; stubbed classes %s",
    report.source,
    config.num_classes,
    config.n_ctx,
    "class-specific" if config.class_specific else "shared",
    config.temporal_depth,
    report.stubbed_classes,
  )
  return ImportedReference(model, config, clip_config, report)


def abstract_model(
  config: DFERCLIPConfig,
  clip_config: CLIPConfig,
  *,
  dtype=jnp.float32,
  attention_impl: str = "xla",
  remat: bool | str = "none",
) -> DFERCLIP:
  """The model's structure without allocating weights (`nnx.eval_shape`)."""
  buffers = None
  if config.head == "prompt":
    buffers = PromptBuffers.zeros(
      config.num_classes, config.n_ctx, clip_config.text.context_length, clip_config.text.width
    )

  def make():
    rngs = nnx.Rngs(0)
    clip = CLIP(clip_config, dtype=dtype, attention_impl=attention_impl, remat=remat, rngs=rngs)
    return DFERCLIP(
      config, clip, prompt_buffers=buffers, dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )

  return nnx.eval_shape(make)


def build_model(
  config: DFERCLIPConfig, clip_config: CLIPConfig, params: Mapping[str, np.ndarray], **kwargs
) -> DFERCLIP:
  """A model with every parameter and buffer taken from `params` (strict on names and shapes)."""
  return clip_weights.assign_params(abstract_model(config, clip_config, **kwargs), params)


def model_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """All parameters and prompt buffers of a model by dotted path (what an export holds)."""
  state = nnx.state(model, nnx.Any(nnx.Param, PromptBuffer))
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def export_model(
  model: DFERCLIP,
  clip_config: CLIPConfig,
  out_dir: str | os.PathLike,
  *,
  extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `model.safetensors` (our dotted names) and `config.json` into `out_dir`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # np.array, not np.ascontiguousarray, which turns 0-d arrays (logit_scale) into (1,).
  save_file(
    {k: np.array(v, order="C") for k, v in model_arrays(model).items()}, str(out / EXPORT_WEIGHTS)
  )
  meta = {
    "format": EXPORT_FORMAT,
    "dfer_clip": model.config.to_dict(),
    "clip": clip_config.to_dict(),
  }
  if extra:
    meta["extra"] = dict(extra)
  (out / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
  return out


def load_exported_model(
  export_dir: str | os.PathLike,
  *,
  dtype=jnp.float32,
  attention_impl: str = "xla",
  remat: bool | str = "none",
) -> tuple[DFERCLIP, DFERCLIPConfig, CLIPConfig]:
  """Restores a model written by `export_model`."""
  from dfer_clip_jax.conversion import torch_io  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(export_dir)
  cfg_path = folder / EXPORT_CONFIG
  if not cfg_path.is_file() or not (folder / EXPORT_WEIGHTS).is_file():
    raise FileNotFoundError(
      f"{folder} is not a model export: expected {EXPORT_CONFIG} and {EXPORT_WEIGHTS}"
    )
  meta = json.loads(cfg_path.read_text())
  if meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
  config = DFERCLIPConfig.from_dict(meta["dfer_clip"])
  clip_config = CLIPConfig.from_dict(meta["clip"])
  params, _ = torch_io.load_state_dict(folder / EXPORT_WEIGHTS)
  model = build_model(
    config, clip_config, params, dtype=dtype, attention_impl=attention_impl, remat=remat
  )
  return model, config, clip_config
