r"""DFER-CLIP on FERV39k (7 classes, one train/test split): the paper's recipe
(docs/method.md).

  python -m dfer_clip_jax.main --config=configs/ferv39k.py --workdir=runs/ferv39k \
    --config.clip.checkpoint=openai/clip-vit-base-patch32 --config.data.root=/data/FERV39k

(the annotation lists are found in data.root under the dataset's own names: README,
"Train on DFEW")

Arguments after the colon: as for configs/dfew.py (fold must stay 1). 53% of FERV39k clips have
16..31 frames, where the reference train sampler always takes frames 0..15:
`--config.data.fix_short_sampling=true` spreads them over the clip (not the paper's recipe).
"""

from dfer_clip_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("ferv39k", arg)
