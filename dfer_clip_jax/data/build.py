r"""Builds packed (array_record) datasets from frame folders: the tfds builders' CLI.

    python -m dfer_clip_jax.data.build --dataset=dfew --manual_dir=/data/DFEW \
        --data_dir=/data/tfds [--config=fold1] [--resize_short_side=224]

Without --config every config of the dataset is built (dfew / mafw: fold1..fold5, ferv39k:
default, synthetic: classes7 and classes11 -- only the one matching the generated class
count can succeed, so pass --config for synthetic). The manual_dir layout each dataset
expects is described in `dfer_clip_jax/data/tfds_builders.py`. Every split is validated
first (every frame decoded); any problem stops the build with the full report and nothing
is written. Read the result with
`dfer_clip_jax.data.packed.packed_source(data_dir, '<dataset>/<config>', 'train')`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import tqdm

from dfer_clip_jax.data import tfds_builders


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dfer_clip_jax.data.build',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', required=True, choices=tfds_builders.DATASETS)
  parser.add_argument('--config', action='append', default=None,
                      help='config to build (repeatable; default: all of the dataset)')
  parser.add_argument('--manual_dir', required=True,
                      help='folder with the annotation lists (and frame folders)')
  parser.add_argument('--data_dir', required=True, help='where the packed dataset is written')
  parser.add_argument('--data_root', default=None,
                      help='root of relative frame folders in the lists (default: manual_dir)')
  parser.add_argument('--resize_short_side', type=int, default=0,
                      help='re-encode frames with this short side (0: keep the frames)')
  parser.add_argument('--jpeg_quality', type=int, default=tfds_builders.DEFAULT_JPEG_QUALITY,
                      help='JPEG quality of re-encoded frames')
  parser.add_argument('--workers', type=int, default=None,
                      help='processes encoding frames (default: all cores)')
  parser.add_argument('--no_check_images', action='store_true',
                      help='validate folders and counts only, without decoding every frame')
  args = parser.parse_args(argv)

  configs = args.config or tfds_builders.base_configs(args.dataset)
  known = tfds_builders.base_configs(args.dataset)
  unknown = [c for c in configs if c not in known]
  if unknown:
    parser.error(f'--config {", ".join(unknown)} is not a config of {args.dataset} '
                 f'(choose from {", ".join(known)})')
  built = []
  start = time.perf_counter()
  for config in tqdm.tqdm(configs, desc=f'{args.dataset} configs', unit='config',
                          disable=len(configs) == 1):
    try:
      name = tfds_builders.build(
          args.dataset, config, manual_dir=args.manual_dir, data_dir=args.data_dir,
          resize_short_side=args.resize_short_side, jpeg_quality=args.jpeg_quality,
          data_root=args.data_root, num_workers=args.workers,
          check_images=not args.no_check_images)
    except (tfds_builders.ManualDirError, tfds_builders.DatasetValidationError) as e:
      print(f'\n{args.dataset}/{config}: build failed:\n{e}', file=sys.stderr)
      return 1
    built.append(name)
  print(f'built {", ".join(built)} in {args.data_dir} ({time.perf_counter() - start:.1f} s); '
        f"read with packed_source({args.data_dir!r}, {built[0]!r}, 'train')")
  return 0


if __name__ == '__main__':
  sys.exit(main())
