"""Device mesh and sharding rules.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
parameters and optimizer state are also split across devices). The batch is sharded over both;
a parameter is sharded over `fsdp` along its largest divisible axis when it is big enough,
otherwise replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 on one axis means "the remaining devices"."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of data and fsdp may be -1")
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if fsdp == -1:
    if n % data:
      raise ValueError(f"mesh: data={data} does not divide the {n} devices")
    fsdp = n // data
  if data * fsdp > n or (data * fsdp < n and jax.process_count() > 1):
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not match the {n} devices")
  # A smaller explicit mesh (single process) uses the first devices, e.g. data=1 for 1 device.
  grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
  # Auto axes: shardings are hints to the compiler, not explicit-sharding types.
  return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """FSDP rule: split the largest axis divisible by the fsdp size, if the tensor is big enough."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, *, min_size: int = 2**18):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (parameters, optimizer state)."""
  fsdp_size = mesh.shape["fsdp"]

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, param_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, abstract_state)
