"""Multi-process start-up: `jax.distributed.initialize` when the config asks for it.

On Cloud TPU VMs and under SLURM or Open MPI JAX detects the cluster itself; anywhere else give
`coordinator_address`, `num_processes` and `process_id` (config or the environment variables
DFER_COORDINATOR_ADDRESS, DFER_NUM_PROCESSES, DFER_PROCESS_ID).
"""

import os

from absl import logging
import jax


def initialize(cfg) -> None:
  address = cfg.coordinator_address or os.environ.get("DFER_COORDINATOR_ADDRESS", "")
  num = cfg.num_processes or int(os.environ.get("DFER_NUM_PROCESSES", "0"))
  pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("DFER_PROCESS_ID", "-1"))
  if not (cfg.initialize or address):
    return
  kwargs = {}
  if address:
    kwargs["coordinator_address"] = address
  if num:
    kwargs["num_processes"] = num
  if pid >= 0:
    kwargs["process_id"] = pid
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
