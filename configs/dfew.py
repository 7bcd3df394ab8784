r"""DFER-CLIP on DFEW (7 classes, 5 folds): the paper's recipe (docs/method.md).

  python -m dfer_clip_jax.main --config=configs/dfew.py:fold=1 --workdir=runs/dfew_fold1 \
    --config.clip.checkpoint=openai/clip-vit-base-patch32 --config.data.root=/data/DFEW

(the annotation lists are found in data.root under the dataset's own names: README,
"Train on DFEW")

Arguments after the colon: fold=1..5, variant=B/32|B/16|L/14, ctx=4|8|16, depth=0..3,
text=class_name|name_with_context|descriptor|template,
baseline=NAME (a row of the paper's tables: README, config_lib.BASELINES), protocol=val|paper.
All folds: `python -m dfer_clip_jax.folds --config=configs/dfew.py --workdir=runs/dfew`.
"""

from dfer_clip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("dfew", arg)
