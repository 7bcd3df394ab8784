"""Converts a reference DFER-CLIP checkpoint into a dfer_clip_jax model export.

  python -m dfer_clip_jax.convert --reference=model_best.pth --out=exports/dfew_fold1

writes `model.safetensors` (our parameter names) and `config.json` (the inferred model and CLIP
configs) into --out; `dfer_clip_jax.conversion.reference.load_exported_model` restores them.
The pickle is read without executing code from it (see `conversion/torch_io.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from dfer_clip_jax.conversion import reference


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m dfer_clip_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", required=True,
                 help="reference checkpoint: .pth/.pt as the reference saves it, a plain state "
                      "dict (.pth, .safetensors, .npz)")
  p.add_argument("--out", required=True, help="output folder for the export")
  p.add_argument("--position", default="end", choices=("end", "middle", "front"),
                 help="class-text position the reference was trained with (not in the tensors)")
  p.add_argument("--token_ids", default=None,
                 help="optional .npy of the reference's (C, 77) prompt token ids; by default "
                      "end-of-text positions are found in the stored suffix embeddings")
  p.add_argument("--text_type", default="descriptor",
                 choices=("class_name", "name_with_context", "descriptor"),
                 help="recorded in the config only: the prompts come from the checkpoint")
  p.add_argument("--temporal_dim_head", type=int, default=64,
                 help="head width of the temporal attention (the reference: 64)")
  p.add_argument("--clip_act", default="quick_gelu", choices=("quick_gelu", "gelu"),
                 help="activation of the CLIP towers (OpenAI CLIP: quick_gelu)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  token_ids = np.load(args.token_ids, allow_pickle=False) if args.token_ids else None
  imported = reference.load_reference_checkpoint(
      args.reference, position=args.position, token_ids=token_ids,
      temporal_dim_head=args.temporal_dim_head, clip_act=args.clip_act,
      text_type=args.text_type)
  cfg, report = imported.config, imported.report
  out = reference.export_model(imported.model, imported.clip_config, args.out,
                               extra={"source": report.source, "metadata": report.metadata})
  v, t = imported.clip_config.vision, imported.clip_config.text
  print(f"read {report.source}")
  print(f"  classes {cfg.num_classes}, context tokens {cfg.n_ctx} "
        f"({'class-specific' if cfg.class_specific else 'shared'}), position {cfg.position}, "
        f"temporal depth {cfg.temporal_depth} ({cfg.temporal_heads}x{cfg.temporal_dim_head} heads, "
        f"MLP {cfg.temporal_mlp_dim}), {cfg.num_frames} frames")
  print(f"  CLIP: image {v.image_size}px patch {v.patch_size} width {v.width} x {v.layers} layers;"
        f" text width {t.width} x {t.layers} layers; embedding {imported.clip_config.embed_dim}")
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
