r"""The demo: DFER-CLIP on the synthetic dynamic-expression dataset, on a laptop CPU, in minutes.

  python -m dfer_clip_jax.main --config=configs/demo.py --workdir=runs/demo

Nothing is downloaded: the synthetic dataset is generated into the workdir, the CLIP is a tiny
random one and the tokenizer a small BPE vocabulary built offline from the class texts. The model
is the real DFER-CLIP (per-frame CLIP, temporal transformer with a class token, class-specific
learnable context before our class descriptions, cosine logits x100) and the paper's recipe
scaled down (per-group learning rates, multistep decay, random-sized crop + flip + brightness),
with three changes, all config switches, because this CLIP starts from random weights instead of
a pretrained one: AdamW instead of SGD (the paper's image-tower lr of 1e-5 only suits a
pretrained tower), CLIP mean/std input normalisation, and milder crops (area >= 50%).
On a 2-core CPU it generates 2,100 clips (about a minute) and trains for a few minutes.

`DFER_README_TEST=1` in the environment shrinks it to seconds (42 clips of 24 px, 2 epochs of 4
frames at 16 px, batch 8): tests/test_readme.py runs the README's commands as printed with it.
"""

import os

from dfer_clip_jax import config_lib

# The README test's sizes (the shapes of tests/test_train.py's tiny run).
_README_TEST = os.environ.get("DFER_README_TEST") == "1"


def get_config(arg=None):
  defaults = dict(classes=7, clips=2100, epochs=25, frames=8)
  if _README_TEST:
    defaults.update(clips=42, epochs=2, frames=4)
  a = config_lib.parse_arg(arg, **defaults)
  c = config_lib.base_config()
  c.seed = 0
  c.dataset = {7: "synthetic", 11: "synthetic11"}[a.classes]
  c.clip.variant = "tiny"
  c.clip.image_size = 32
  c.model.temporal_heads = 4
  c.model.temporal_dim_head = 16
  c.model.temporal_mlp_dim = 128
  c.data.source = "synthetic"
  c.data.synthetic_clips = a.clips
  c.data.synthetic_size = 48
  c.data.synthetic_max_frames = 48  # short clips keep generation fast; 8 frames are sampled
  c.model.num_frames = a.frames
  c.data.augment = "brightness"
  c.data.crop_min_area = 0.5
  c.model.normalize = True
  c.data.worker_count = 0
  c.data.val_fraction = 0.1
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.05
  c.optim.lr = dict(temporal=1e-3, image=1e-3, prompt=1e-3, head=1e-3)
  c.optim.milestones = (int(a.epochs * 0.7), int(a.epochs * 0.9))
  c.optim.warmup_epochs = 1.0
  c.train.epochs = a.epochs
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 50
  if _README_TEST:
    c.data.synthetic_size = 24
    c.clip.image_size = 16
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
  c.lock()
  return c
