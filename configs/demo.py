r"""The demo: DFER-CLIP on the synthetic dynamic-expression dataset, on a laptop CPU, in minutes.

  python -m dfer_clip_jax.main --config=configs/demo.py --workdir=runs/demo

Nothing is downloaded: the synthetic dataset is generated into the workdir, the CLIP is a tiny
random one and the tokenizer a small BPE vocabulary built offline from the class texts. The model
is the real DFER-CLIP (per-frame CLIP, temporal transformer with a class token, class-specific
learnable context before our class descriptions, cosine logits x100) with the paper's recipe
scaled down: SGD with momentum and coupled weight decay, per-group learning rates, multistep
decay. Because the CLIP starts from random weights, its image tower gets a much larger learning
rate than the paper's 1e-5 (which fine-tunes a pretrained CLIP).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  a = common.parse_arg(arg, classes=7, clips=700, epochs=12, frames=8)
  c = common.base_config()
  c.seed = 0
  c.dataset = "synthetic"
  c.num_classes = a.classes
  c.clip.variant = "tiny"
  c.clip.image_size = 32
  c.model.temporal_heads = 4
  c.model.temporal_dim_head = 16
  c.model.temporal_mlp_dim = 128
  c.data.source = "synthetic"
  c.data.synthetic_clips = a.clips
  c.data.synthetic_size = 48
  c.data.num_frames = a.frames
  c.data.augment = "dfew"
  c.data.worker_count = 0
  c.data.val_fraction = 0.1
  c.optim.lr_image = 0.05
  c.optim.lr_temporal = 0.05
  c.optim.lr_prompt = 0.01
  c.optim.milestones = (int(a.epochs * 0.6), int(a.epochs * 0.8))
  c.optim.warmup_epochs = 0.5
  c.train.epochs = a.epochs
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 50
  c.lock()
  return c
