"""Converts a reference DFER-CLIP checkpoint into a dfer_clip_jax model export.

  python -m dfer_clip_jax.convert --reference=model_best.pth --out=exports/dfew_fold1

writes `model.safetensors` (our parameter names) and `config.json` (the inferred model and CLIP
configs, with the class names) into --out; `dfer_clip_jax.conversion.reference.load_exported_model`
restores them, and `dfer_clip_jax.predict --checkpoint=<out>` runs the model on videos.

The reference's tensors don't name the classes: a 7-class checkpoint gets the DFEW / FERV39k
names and an 11-class one the MAFW names, in the reference's label order; --class_names (a file
with one name per line, or a comma-separated list) names them otherwise.
The pickle is read without executing code from it (see `conversion/torch_io.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from dfer_clip_jax import cli
from dfer_clip_jax.conversion import reference
from dfer_clip_jax.data import datasets


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "reference",
    None,
    "reference checkpoint: .pth/.pt as the reference saves "
    "it, a plain state dict (.pth, .safetensors, .npz)",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_string("out", None, "output folder for the export", required=True, flag_values=fv)
  flags.DEFINE_enum(
    "position",
    "end",
    ["end", "middle", "front"],
    "class-text position the reference was trained with (not in the tensors)",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "token_ids",
    None,
    "optional .npy of the reference's (C, 77) prompt token "
    "ids; by default end-of-text positions are found in the stored suffix "
    "embeddings",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "text_type",
    "descriptor",
    ["class_name", "name_with_context", "descriptor"],
    "recorded in the config only: the prompts come from the checkpoint",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "temporal_dim_head",
    64,
    "head width of the temporal attention (the reference: 64)",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "class_names",
    None,
    "class names in label order: a file (one per line) or a comma-separated list; default: "
    "the DFEW/FERV39k names for 7 classes, the MAFW names for 11",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "clip_act",
    "quick_gelu",
    ["quick_gelu", "gelu"],
    "activation of the CLIP towers (OpenAI CLIP: quick_gelu)",
    flag_values=fv,
  )


def parse_class_names(value: str) -> tuple[str, ...]:
  """--class_names: a classes file (one name per line) or a comma-separated list."""
  if os.path.isfile(value):
    return datasets.read_classes_file(value)
  names = tuple(n.strip() for n in value.split(","))
  if not all(names):
    raise ValueError(f"--class_names={value!r}: no such file, and an empty name in the list")
  if len(set(names)) != len(names):
    raise ValueError(f"--class_names={value!r} repeats a name")
  return names


def main(argv: Sequence[str] | None = None) -> int:
  prog = "python -m dfer_clip_jax.convert"
  args, _ = cli.parse(prog, __doc__, _define, argv, paths=("reference", "out", "token_ids"))
  token_ids = np.load(args.token_ids, allow_pickle=False) if args.token_ids else None
  overrides = {}
  if args.class_names:
    try:
      overrides["class_names"] = parse_class_names(args.class_names)
    except ValueError as e:
      cli.fail(prog, str(e))
  try:
    imported = reference.load_reference_checkpoint(
      args.reference,
      position=args.position,
      token_ids=token_ids,
      temporal_dim_head=args.temporal_dim_head,
      clip_act=args.clip_act,
      text_type=args.text_type,
      **overrides,
    )
  except ValueError as e:
    cli.fail(prog, f"{args.reference}: {e}")
  cfg, report = imported.config, imported.report
  out = reference.export_model(
    imported.model,
    imported.clip_config,
    args.out,
    extra={"source": report.source, "metadata": report.metadata},
  )
  v, t = imported.clip_config.vision, imported.clip_config.text
  print(f"read {report.source}")
  print(
    f"  classes {cfg.num_classes}, context tokens {cfg.n_ctx} "
    f"({'class-specific' if cfg.class_specific else 'shared'}), position {cfg.position}, "
    f"temporal depth {cfg.temporal_depth} ({cfg.temporal_heads}x{cfg.temporal_dim_head} heads, "
    f"MLP {cfg.temporal_mlp_dim}), {cfg.num_frames} frames"
  )
  print(f"  class names: {', '.join(cfg.class_names)}")
  print(
    f"  CLIP: image {v.image_size}px patch {v.patch_size} width {v.width} x {v.layers} layers;"
    f" text width {t.width} x {t.layers} layers; embedding {imported.clip_config.embed_dim}"
  )
  if report.metadata:
    print(f"  metadata: {report.metadata}")
  if report.stubbed_classes:
    print(f"  stubbed (not executed) pickled classes: {', '.join(report.stubbed_classes)}")
  for w in report.warnings:
    print(f"  warning: {w}")
  print(f"wrote {out / reference.EXPORT_WEIGHTS} and {out / reference.EXPORT_CONFIG}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
