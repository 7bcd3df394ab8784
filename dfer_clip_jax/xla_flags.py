"""XLA's GPU compiler options for training, by preset name (`train.xla_gpu_flags`).

XLA reads `XLA_FLAGS` once, when the first backend starts, so `apply` must run before anything
touches a device (`main` calls it right after reading the config). Flags the user already set in
`XLA_FLAGS` win over the preset's. The presets only name options that every jaxlib build knows
(XLA aborts on an unknown flag), and they are applied only where a CUDA plugin is installed:
TPU runtimes parse `XLA_FLAGS` too and need none of these.

Presets (each measured against the previous one by `benchmarks/gpu_check.sh`):
  none     XLA's own defaults.
  lhs      + the latency-hiding scheduler: overlaps collectives (multi-GPU gradient
           all-reduces, FSDP gathers) with compute; on one GPU it only reorders.
  cublas   + matrix products through cuBLAS/cuBLASLt instead of XLA's Triton GEMM emitter
           (fewer autotuning candidates: shorter compiles).
  nographs + no CUDA graphs (command buffers) for the step's kernels.
"""

from __future__ import annotations

import importlib.metadata
import os

from absl import logging

PRESETS: dict[str, tuple[str, ...]] = {
  "none": (),
  "lhs": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
  "cublas": (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
  ),
  "nographs": (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_command_buffer=",
  ),
}


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def merged(preset: str, existing: str) -> str:
  """`existing` XLA_FLAGS plus the preset's flags that it does not set already."""
  if preset not in PRESETS:
    raise ValueError(f"train.xla_gpu_flags={preset!r}: expected one of {sorted(PRESETS)}")
  have = {_flag_name(f) for f in existing.split()}
  extra = [f for f in PRESETS[preset] if _flag_name(f) not in have]
  return " ".join([existing.strip()] + extra if existing.strip() else extra)


def cuda_plugin_installed() -> bool:
  """Whether this environment can start jax's CUDA backend (a jax CUDA plugin is installed and
  JAX_PLATFORMS does not exclude it)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  for dist in importlib.metadata.distributions():
    name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
    if name.startswith("jax-cuda") and name.endswith("-plugin"):
      return True
  return False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def apply(preset: str, *, force: bool = False) -> str:
  """Adds the preset's flags to `XLA_FLAGS` (where a CUDA backend can start, or `force`);
  returns the resulting XLA_FLAGS. Warns if a backend already started (the flags then take
  effect only in new processes)."""
  existing = os.environ.get("XLA_FLAGS", "")
  value = merged(preset, existing)  # validates the name everywhere
  if value == existing or not (force or cuda_plugin_installed()):
    return existing
  if _backend_started():
    logging.warning(
      "train.xla_gpu_flags=%s: a jax backend is already running, so these XLA "
      "flags apply only to new processes: %s",
      preset,
      value,
    )
  os.environ["XLA_FLAGS"] = value
  return value
