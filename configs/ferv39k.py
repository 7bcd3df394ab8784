r"""DFER-CLIP on FERV39k (7 classes, one train/test split): the paper's recipe (SPEC section 2).

  python -m dfer_clip_jax.main --config=configs/ferv39k.py --workdir=runs/ferv39k \
    --config.clip.checkpoint=clip-vit-base-patch32 --config.data.root=/data/FERV39k \
    --config.data.train_list=annotations/FERV39k/train.txt \
    --config.data.test_list=annotations/FERV39k/test.txt

Arguments after the colon: as for configs/dfew.py (fold must stay 1). 53% of FERV39k clips have
16..31 frames, where the reference train sampler always takes frames 0..15:
`--config.data.fix_short_sampling=true` spreads them over the clip (not the paper's recipe).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  a = common.common_args(arg)
  c = common.base_config()
  c.dataset = "ferv39k"
  c.data.augment = "ferv39k"  # rotation, random-sized crop, flip
  common.apply_args(c, a)
  if c.fold != 1:
    raise ValueError(f"FERV39k has a single split (fold=1), got fold={c.fold}")
  c.lock()
  return c
