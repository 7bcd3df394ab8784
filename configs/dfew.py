r"""DFER-CLIP on DFEW (7 classes, 5 folds): the paper's recipe (SPEC section 2).

  python -m dfer_clip_jax.main --config=configs/dfew.py:fold=1 --workdir=runs/dfew_fold1 \
    --config.clip.checkpoint=clip-vit-base-patch32 --config.data.root=/data/DFEW \
    --config.data.train_list=annotations/DFEW/set_1_train.txt \
    --config.data.test_list=annotations/DFEW/set_1_test.txt

Arguments after the colon: fold=1..5, variant=B/32|B/16|L/14, ctx=4|8|16, depth=0..3,
text=class_name|name_with_context|descriptor|template,
baseline=zeroshot|linear_probe|finetune|finetune_tm|coop, protocol=val|paper.
All folds: `python -m dfer_clip_jax.folds --config=configs/dfew.py --workdir=runs/dfew`.
"""

import os
import sys

# Config files are executed by path; make `configs.common` importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  a = common.common_args(arg)
  c = common.base_config()
  c.dataset = "dfew"
  c.data.augment = "dfew"  # brightness jitter, random-sized crop, flip
  common.apply_args(c, a)
  if not 1 <= c.fold <= 5:
    raise ValueError(f"DFEW has folds 1..5, got fold={c.fold}")
  c.lock()
  return c
