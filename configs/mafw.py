r"""DFER-CLIP on MAFW (11 classes, 5 folds): the paper's recipe (SPEC section 2).

  python -m dfer_clip_jax.main --config=configs/mafw.py:fold=1 --workdir=runs/mafw_fold1 \
    --config.clip.checkpoint=clip-vit-base-patch32 --config.data.root=/data/MAFW \
    --config.data.train_list=annotations/MAFW/set_1_train.txt \
    --config.data.test_list=annotations/MAFW/set_1_test.txt

Arguments after the colon: as for configs/dfew.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  a = common.common_args(arg)
  c = common.base_config()
  c.dataset = "mafw"
  c.data.augment = "mafw"  # random-sized crop and flip only
  common.apply_args(c, a)
  if not 1 <= c.fold <= 5:
    raise ValueError(f"MAFW has folds 1..5, got fold={c.fold}")
  c.lock()
  return c
