"""The config every config file builds on: the full key set with defaults, `parse_arg` for
`file.py:k=v,...`, and the paper recipe of a dataset (`paper_config`).

Every key the code reads is defined here with its default and a comment; configs are returned
locked, so a misspelled key (in a config file or a `--config.x=...` override) fails at start-up.
The config files (`configs/*.py`, outside the package) import this module; nothing in the package
imports them.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from dfer_clip_jax import cli
from dfer_clip_jax.conversion import hub
from dfer_clip_jax.data import datasets
from dfer_clip_jax.models import class_texts, dfer_clip

# Arguments accepted after the colon in `--config=configs/dfew.py:fold=2,variant=B/16`.
VARIANTS = ("B/32", "B/16", "L/14", "tiny")

# The paper's rows as presets (README, "Reproduce the paper's tables"): config key -> value,
# applied by `baseline=NAME` after the colon. The default (no baseline) is DFER-CLIP itself (also
# named `dfer_clip`). Each preset sets its row's whole model, trained parts and text, so that
# one argument gives one row; `ctx=`, `depth=` and `text=` still apply on top.
_NO_TRAINING = {f"optim.lr.{g}": 0.0 for g in ("temporal", "image", "prompt", "head")}
# Frozen CLIP, frame mean, CLIP's own logit scale: what CoOp and Co-CoOp leave of the model.
_FROZEN_CLIP = {"model.temporal": "mean", "model.logit_scale": "clip", "optim.lr.image": 0.0}
_NO_TM = {"model.temporal": "mean"}  # the paper's "w/o TM": the mean of the frame features
_MANUAL = {"model.n_ctx": 0, "model.text_type": "template"}
BASELINES: dict[str, dict[str, object]] = {
  # DFER-CLIP (Tables 1-3): 8 class-specific context tokens before the descriptors; image tower,
  # temporal transformer (depth 1, or 2 / 3) and context train.
  "dfer_clip": {},
  "dfer_clip_depth2": {"model.temporal_depth": 2},
  "dfer_clip_depth3": {"model.temporal_depth": 3},
  # DFER-CLIP without the temporal model (Table 1 with M = 4 / 8 / 16; Tables 2 and 3 with 8).
  "dfer_clip_no_tm": {**_NO_TM},
  "dfer_clip_no_tm_ctx4": {**_NO_TM, "model.n_ctx": 4},
  "dfer_clip_no_tm_ctx16": {**_NO_TM, "model.n_ctx": 16},
  # CLIP as is: frame mean, "an expression of [class].", CLIP's own learned logit scale (argmax
  # is scale-free; the scale only matters for probabilities and loss); nothing trained.
  "zeroshot": {
    "model.temporal": "mean",
    **_MANUAL,
    "model.template": class_texts.MANUAL_TEMPLATES["expression"],
    "model.logit_scale": "clip",
    **_NO_TRAINING,
  },
  # The same on FaRL's ViT-B/16 weights: needs --config.clip.checkpoint=<OpenAI ViT-B-16.pt>
  # --config.clip.overlay=<FaRL .pth> (FaRL's file holds the CLIP tensors it changed).
  "zeroshot_farl": {
    "clip.variant": "B/16",
    "model.temporal": "mean",
    **_MANUAL,
    "model.template": class_texts.MANUAL_TEMPLATES["expression"],
    "model.logit_scale": "clip",
    **_NO_TRAINING,
  },
  # Frame mean of frozen CLIP image features -> a Linear head; only the head trains.
  "linear_probe": {"model.head": "linear", "model.temporal": "mean", "optim.lr.image": 0.0},
  # Frame mean -> a Linear head; head and image tower train.
  "finetune": {"model.head": "linear", "model.temporal": "mean"},
  # Temporal transformer -> a Linear head; head, temporal model and image tower train.
  "finetune_tm": {"model.head": "linear"},
  # CoOp: CLIP frozen, 16 context tokens shared by all classes before the class name; only the
  # context trains.
  "coop": {
    **_FROZEN_CLIP,
    "model.n_ctx": 16,
    "model.class_specific": False,
    "model.text_type": "class_name",
  },
  # Co-CoOp: CoOp with 4 context tokens started from "a photo of a" and a meta-network giving
  # each video its own prompts; context and meta-network train.
  "cocoop": {
    **_FROZEN_CLIP,
    "model.n_ctx": 4,
    "model.class_specific": False,
    "model.text_type": "class_name",
    "model.ctx_init": "a photo of a",
    "model.meta_net": True,
  },
  # Table 3's manual prompts, no learnable context, without the temporal model; image trains.
  "manual_photo": {**_NO_TM, **_MANUAL, "model.template": class_texts.MANUAL_TEMPLATES["photo"]},
  "manual_expression": {
    **_NO_TM,
    **_MANUAL,
    "model.template": class_texts.MANUAL_TEMPLATES["expression"],
  },
  # Table 3's [learnable context] [class]: DFER-CLIP with class names instead of descriptors,
  # without and with the temporal model.
  "ctx_class": {**_NO_TM, "model.text_type": "class_name"},
  "ctx_class_tm": {"model.text_type": "class_name"},
}


def apply_preset(c: ml_collections.ConfigDict, preset: dict[str, object]) -> None:
  """Sets each dotted `section.key` of `preset` in `c` (the key must exist)."""
  for dotted, value in preset.items():
    *sections, key = dotted.split(".")
    node = c
    for name in sections:
      node = node[name]
    if key not in node:
      raise KeyError(f"preset key {dotted!r} is not a config key")
    node[key] = value


def parse_arg(arg: str | None, **defaults):
  """Parses `k=v,k2=v2` with the types of `defaults`; unknown keys raise (big_vision style)."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
    default = defaults[key]
    if not sep:  # a bare flag means True
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
          f"config argument {key}={value!r}: expected {type(default).__name__}"
        ) from e
  return out


def clip_preset(variant: str) -> dict:
  """Image size and patch of the CLIP sizes we name; used for random init and benchmarks."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown CLIP variant {variant!r}; expected one of {VARIANTS}")
  return {
    "B/32": dict(image_size=224),
    "B/16": dict(image_size=224),
    "L/14": dict(image_size=224),
    "tiny": dict(image_size=32),
  }[variant]


def base_config() -> ml_collections.ConfigDict:
  """Every key, with the paper recipe (docs/method.md, Training) as defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 1  # one seed for init, shuffling, augmentation (the reference uses 1)
  # A registered dataset (`data/datasets.py`: class names, folds, augmentation op, packed name):
  # dfew | ferv39k | mafw | synthetic (7 classes) | synthetic11 | custom (data.classes_file).
  c.dataset = "dfew"
  c.fold = 1  # 1..5 for DFEW and MAFW; FERV39k has one split

  c.clip = ml_collections.ConfigDict()
  # HF CLIP folder or Hub id (openai/clip-vit-base-patch32), or an OpenAI/OpenCLIP file;
  # "" = random init of variant.
  c.clip.checkpoint = ""
  # A second file of OpenAI-named CLIP tensors (e.g. FaRL's .pth) that replace the checkpoint's
  # of the same name; its other keys are ignored, the checkpoint's other tensors kept.
  c.clip.overlay = ""
  c.clip.variant = "B/32"  # CLIP size for random init: B/32 | B/16 | L/14 | tiny
  c.clip.tokenizer = ""  # folder with vocab.json + merges.txt; "" = the checkpoint folder
  c.clip.act = ""  # activation of OpenAI-format weights ("" = quick_gelu; LAION: gelu)
  c.clip.image_size = 224  # input resolution (position embedding resampled if it differs)
  c.clip.dtype = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
  # auto: cuDNN flash attention on GPUs in bf16 (sequences padded to an even length, the
  # padding masked) where cuDNN accepts the shapes, else XLA's; xla | cudnn | plain (the formula).
  c.clip.attention_impl = "auto"
  # Image-tower activations kept for the backward pass: none (all: fastest, most memory) |
  # block (recompute each block from its input: least memory) | dots (keep the matrix products'
  # outputs, recompute the elementwise work between them).
  c.clip.remat = "none"

  # The model's config: the fields of `DFERCLIPConfig` with its defaults (the paper's model;
  # each field is documented there), passed in unchanged and stored with every checkpoint. The
  # class names are not a key: they come from the data.
  c.model = ml_collections.ConfigDict(
    {
      f.name: f.default
      for f in dataclasses.fields(dfer_clip.DFERCLIPConfig)
      if f.name != "class_names"
    }
  )

  c.data = ml_collections.ConfigDict()
  c.data.source = "folders"  # folders (annotation lists) | packed (data.build) | synthetic
  c.data.root = ""  # joined with relative frame-folder paths of the annotation lists
  c.data.train_list = ""  # annotation list of the training split ({fold} = the fold number)
  c.data.test_list = ""  # annotation list of the test split ({fold} = the fold number)
  c.data.packed_dir = ""  # TFDS data_dir of packed datasets
  c.data.packed_name = ""  # e.g. dfew/fold{fold}; "" = derived from dataset and fold
  c.data.synthetic_dir = ""  # "" = <workdir>/synthetic (generated when absent)
  c.data.synthetic_clips = 700  # clips generated for the synthetic dataset
  c.data.synthetic_size = 64  # frame side of generated synthetic clips
  c.data.synthetic_max_frames = 120  # longest generated synthetic clip (frames)
  c.data.classes_file = ""  # the custom dataset's class names, one per line in label order
  # The op before the crop: dataset (the registry's) | none | brightness | rotation.
  c.data.augment = "dataset"
  c.data.crop_min_area = 0.08  # smallest area fraction of the random-sized crop (reference)
  c.data.fix_short_sampling = False  # spread train frames over 16..31-frame clips (paper: off)
  # OpenCV decoding (reduced scale when the crop allows) + uint8 crop / resize: the reference's
  # random draws, pixels within a few levels; learns the same (benchmarks.decode_paths) at 2x+
  # less CPU per clip. False: PIL, pixel-identical to the reference's loader (parity work).
  c.data.fast_decode = True
  c.data.bad_clip_policy = "error"  # error | skip (skipped clips are counted and reported)
  c.data.validate = True  # check every clip's frames before training
  c.data.worker_count = 4  # input worker processes, kept for the run (0 = threads in this process)
  c.data.device_prefetch = 2  # batches copied to the devices ahead of the running step
  c.data.val_fraction = 0.1  # stratified validation split carved from train (0 = none)
  c.data.val_seed = 0  # seed of that split

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"  # sgd (PyTorch-form momentum, coupled weight decay) | adamw
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4  # coupled for sgd (added to the gradient), decoupled for adamw
  # Parameter groups: name -> regex over dotted parameter paths; parameters of no group are
  # frozen (the text tower, token embedding, CLIP's logit scale). "prompt" holds the context and
  # Co-CoOp's meta-network.
  c.optim.groups = ml_collections.ConfigDict(
    dict(
      temporal=r"temporal_net\..*",
      image=r"clip\.visual\..*",
      prompt=r"prompt_learner\.(ctx|meta_net\..*)",
      head=r"head\..*",
    )
  )
  # Base learning rate of each group; 0 freezes it.
  c.optim.lr = ml_collections.ConfigDict(dict(temporal=1e-2, image=1e-5, prompt=1e-3, head=1e-3))
  c.optim.milestones = (30, 40)  # epochs at which the learning rates are multiplied by gamma
  c.optim.gamma = 0.1
  c.optim.warmup_epochs = 0.0  # linear warm-up (paper: none)
  c.optim.clip_grad_norm = 0.0  # global gradient-norm clipping (0 = off, paper)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 50
  c.train.batch_size = 48  # global batch (clips); the last partial batch is dropped
  c.train.eval_batch_size = 48  # global batch for evaluation (padded, masked)
  # Gradient accumulation: each step runs its batch as this many sequential slices (the same
  # update as one pass, less activation memory; each device's share must divide evenly).
  c.train.microbatches = 1
  # XLA's GPU compiler options, a preset of dfer_clip_jax/xla_flags.py: none | lhs | cublas |
  # nographs (applied where a CUDA backend can start; flags already in XLA_FLAGS win).
  c.train.xla_gpu_flags = "none"
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500  # plus one at every epoch end
  c.train.keep_checkpoints = 2  # last K kept, plus the best by validation UAR
  c.train.eval_every_epochs = 1
  c.train.select_metric = "uar"  # metric that picks the best checkpoint (on validation)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = the remaining devices)
  c.mesh.fsdp = 1  # parameter-sharding axis size
  c.mesh.fsdp_min_size = 2**18  # parameters with fewer elements stay replicated

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize (auto-detects TPU/SLURM/MPI)
  c.distributed.coordinator_address = ""  # host:port for manual clusters
  c.distributed.num_processes = 0  # 0 = auto
  c.distributed.process_id = -1  # -1 = auto
  # How long processes wait for each other's host-side work (process 0 generating or a process
  # validating its part of the data, writing the tokenizer) before giving up, in seconds.
  c.distributed.wait_timeout_s = 3600
  return c


def apply_args(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
  """Applies the common variant arguments (see `common_args`) to a config."""
  c.fold = a.fold
  c.clip.variant = a.variant
  c.clip.image_size = clip_preset(a.variant)["image_size"]
  if a.baseline:
    if a.baseline not in BASELINES:
      raise ValueError(f"baseline={a.baseline!r}: expected one of {sorted(BASELINES)}")
    apply_preset(c, BASELINES[a.baseline])
  if a.ctx >= 0:
    c.model.n_ctx = a.ctx
  if a.depth >= 0:
    c.model.temporal_depth = a.depth
  if a.text:
    if a.text not in class_texts.TEXT_TYPES:
      raise ValueError(f"text={a.text!r}: expected one of {class_texts.TEXT_TYPES}")
    c.model.text_type = a.text
    if a.text == "template":
      c.model.template = class_texts.MANUAL_TEMPLATES["photo"]
      c.model.n_ctx = 0
  if a.protocol not in ("val", "paper"):
    raise ValueError(f"protocol={a.protocol!r}: expected val or paper")
  if a.protocol == "paper":
    c.data.val_fraction = 0.0  # train on the whole train split; select on test, labelled so


def common_args(arg: str | None, **extra):
  return parse_arg(
    arg, fold=1, variant="B/32", ctx=-1, depth=-1, text="", baseline="", protocol="val", **extra
  )


def paper_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's recipe on a registered dataset, with the common variant arguments; locked."""
  return paper_config_from_args(dataset, common_args(arg))


def paper_config_from_args(dataset: str, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`paper_config` from already parsed arguments (`common_args`, maybe with extra ones)."""
  c = base_config()
  c.dataset = dataset
  apply_args(c, a)
  datasets.get(dataset).check_fold(c.fold)
  c.lock()
  return c


# Config keys holding paths of the user's files and folders (made absolute by `resolve_paths`).
PATH_KEYS = (
  "data.root",
  "data.packed_dir",
  "data.synthetic_dir",
  "data.classes_file",
  "clip.checkpoint",
  "clip.overlay",
  "clip.tokenizer",
  "model.class_texts_file",
)
# Keys that may also name a Hugging Face Hub id (`owner/name`), which stays as it is.
HUB_KEYS = ("clip.checkpoint", "clip.tokenizer")
LIST_KEYS = ("data.train_list", "data.test_list")


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose paths are absolute, `~` expanded (the original is left as is).

  Relative paths are taken from the current folder, as a shell user means them, so the run
  reads the same files whatever folder its libraries (Orbax among them) work in. An annotation
  list is looked for in the current folder first, then under `data.root`; an empty list means
  the dataset's own list in `data.root` (`datasets.Dataset.find_list`). Applying it twice
  changes nothing.
  """
  c = config.copy_and_resolve_references()
  for dotted in PATH_KEYS:
    section, key = dotted.split(".")
    value = c[section].get(key)
    if value and not (dotted in HUB_KEYS and hub.is_hub_id(value)):
      c[section][key] = cli.absolute(value)
  root = c.data.root
  for dotted in LIST_KEYS:
    key = dotted.split(".")[1]
    given = c.data[key]
    if not given:
      continue
    path = os.path.expanduser(given)
    here = cli.absolute(path)
    if not os.path.isabs(path) and root and not os.path.exists(here.format(fold=c.fold)):
      c.data[key] = os.path.join(root, path)
    else:
      c.data[key] = here
  if config.is_locked:
    c.lock()
  return c
