r"""Train and/or evaluate DFER-CLIP.

  python -m dfer_clip_jax.main --config=configs/dfew.py:fold=1 --workdir=runs/dfew_fold1
  python -m dfer_clip_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m dfer_clip_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval

Rerunning the same command resumes from the newest usable checkpoint in the workdir.

Multi-process (one process per TPU host or GPU, the same command on every process):
`--config.distributed.initialize=True` on Cloud TPU VMs, under SLURM or Open MPI (JAX finds the
cluster), or DFER_COORDINATOR_ADDRESS / DFER_NUM_PROCESSES / DFER_PROCESS_ID anywhere else;
launch/tpu_pod.sh, launch/slurm_gpu.sbatch and launch/local.sh do it for you.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from dfer_clip_jax import cli, config_lib, distributed, evaluate, train, xla_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, reports.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train_and_eval",
  ["train", "eval", "train_and_eval"],
  "train_and_eval: train with per-epoch evaluation and a final report; "
  "train: the same (evaluation is part of training); eval: restore "
  "--checkpoint and evaluate the test split.",
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  "latest",
  "For --mode=eval: latest, best, a step, or a checkpoint folder "
  "(e.g. from python -m dfer_clip_jax.convert).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and grain log every operation at INFO; the console keeps our progress lines.
    logging.set_verbosity(logging.WARNING)
    # We use transformers for tokenizers and configs only: its "PyTorch was not found" notice
    # (printed when it is first imported) is expected, not a problem.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  # Every path on the command line is absolute from here on (config paths: config_lib).
  config = config_lib.resolve_paths(_CONFIG.value)
  workdir = cli.absolute(_WORKDIR.value)
  which = _CHECKPOINT.value
  if which not in ("latest", "best") and not which.isdigit():
    which = cli.absolute(which)
  # Before anything starts a backend: XLA reads its flags once.
  xla_flags.apply(config.train.xla_gpu_flags)
  distributed.initialize(config.distributed)
  logging.info("config:\n%s", config)
  if _MODE.value == "eval":
    evaluate.evaluate_checkpoint(config, train.local_workdir(workdir), which)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
