r"""Builds packed datasets from frame folders: the tfds builders' CLI.

    python -m dfer_clip_jax.data.build --dataset=dfew --manual_dir=/data/DFEW \
        --data_dir=/data/tfds [--config=fold1] [--resize_short_side=224]

Without --config every config of the dataset is built (dfew / mafw: fold1..fold5, ferv39k:
default, synthetic: classes7 and classes11 -- only the one matching the generated class
count can succeed, so pass --config for synthetic). The manual_dir layout each dataset
expects is described in `dfer_clip_jax/data/tfds_builders.py`. Every split is validated
first (every frame decoded); any problem stops the build with the full report and nothing
is written. The result (layout 2.0.0, `<data_dir>/<dataset>/<config>/2.0.0/`: per split a
`<split>.frames` file of every frame's bytes, its frame and clip tables, and tfds' index
records; see `packed.py`) appears only once every split is written. Read it with
`dfer_clip_jax.data.packed.packed_source(data_dir, '<dataset>/<config>', 'train')`. Builds of
layout 1.0.0 are not read any more: rerun this command for them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import tqdm
from absl import flags

from dfer_clip_jax import cli
from dfer_clip_jax.data import tfds_builders

_PROG = "python -m dfer_clip_jax.data.build"


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum(
    "dataset", None, list(tfds_builders.DATASETS), "dataset to pack", required=True, flag_values=fv
  )
  flags.DEFINE_multi_string(
    "config", None, "config to build (repeatable; default: all of the dataset)", flag_values=fv
  )
  flags.DEFINE_string(
    "manual_dir",
    None,
    "folder with the annotation lists (and frame folders)",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "data_dir", None, "where the packed dataset is written", required=True, flag_values=fv
  )
  flags.DEFINE_string(
    "data_root",
    None,
    "root of relative frame folders in the lists (default: manual_dir)",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "resize_short_side",
    0,
    "re-encode frames with this short side (0: keep the frames)",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "jpeg_quality",
    tfds_builders.DEFAULT_JPEG_QUALITY,
    "JPEG quality of re-encoded frames",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "workers", None, "processes encoding frames (default: all cores)", flag_values=fv
  )
  flags.DEFINE_boolean(
    "no_check_images",
    False,
    "validate folders and counts only, without decoding every frame",
    flag_values=fv,
  )


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(_PROG, __doc__, _define, argv, paths=("manual_dir", "data_dir", "data_root"))

  configs = args.config or tfds_builders.base_configs(args.dataset)
  known = tfds_builders.base_configs(args.dataset)
  unknown = [c for c in configs if c not in known]
  if unknown:
    cli.fail(
      _PROG,
      f"--config {', '.join(unknown)} is not a config of {args.dataset} "
      f"(choose from {', '.join(known)})",
    )
  built = []
  start = time.perf_counter()
  for config in tqdm.tqdm(
    configs, desc=f"{args.dataset} configs", unit="config", disable=len(configs) == 1
  ):
    try:
      name = tfds_builders.build(
        args.dataset,
        config,
        manual_dir=args.manual_dir,
        data_dir=args.data_dir,
        resize_short_side=args.resize_short_side,
        jpeg_quality=args.jpeg_quality,
        data_root=args.data_root,
        num_workers=args.workers,
        check_images=not args.no_check_images,
      )
    except (tfds_builders.ManualDirError, tfds_builders.DatasetValidationError) as e:
      print(f"\n{args.dataset}/{config}: build failed:\n{e}", file=sys.stderr)
      return 1
    built.append(name)
  print(
    f"built {', '.join(built)} in {args.data_dir} ({time.perf_counter() - start:.1f} s); "
    f"read with packed_source({args.data_dir!r}, {built[0]!r}, 'train')"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
