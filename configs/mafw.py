r"""DFER-CLIP on MAFW (11 classes, 5 folds): the paper's recipe (docs/method.md).

  python -m dfer_clip_jax.main --config=configs/mafw.py:fold=1 --workdir=runs/mafw_fold1 \
    --config.clip.checkpoint=openai/clip-vit-base-patch32 --config.data.root=/data/MAFW

(the annotation lists are found in data.root under the dataset's own names: README,
"Train on DFEW")

Arguments after the colon: as for configs/dfew.py.
"""

from dfer_clip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("mafw", arg)
