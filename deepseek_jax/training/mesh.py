"""The device mesh of a training run and the data-parallel placement of its arrays.

Axes (DESIGN.md): data, fsdp, expert, tensor; a size of -1 takes the devices the others leave. The global
batch is split over the data-parallel axes (data, fsdp); the train state is replicated. Placing parameters by
their logical axis names is the job of `deepseek_jax.sharding`: its shardings can replace `state_sharding`
wherever a TrainState-shaped sharding function is taken (`init_state`, `Trainer`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.training.errors import UserError

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes (-1 = the remaining devices) against the device count.

  Args:
    sizes: {'data', 'fsdp', 'expert', 'tensor'} ints (missing axes are 1).
    num_devices: devices available.
  Returns:
    The four sizes, in AXES order.
  Raises:
    UserError: more than one -1, a size below 1, or a product that is not the device count.
  """
  vals = [int(sizes.get(a, 1)) for a in AXES]
  free = [i for i, v in enumerate(vals) if v == -1]
  if len(free) > 1:
    raise UserError(f"mesh: only one axis may be -1, got {dict(zip(AXES, vals))}")
  for a, v in zip(AXES, vals):
    if v == 0 or v < -1:
      raise UserError(f"mesh.{a}={v} must be >= 1 or -1")
  fixed = math.prod(v for v in vals if v != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"mesh {dict(zip(AXES, vals))} does not fit {num_devices} devices: the fixed axes "
                      f"({fixed} devices) do not divide it")
    vals[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh {dict(zip(AXES, vals))} needs {fixed} devices but {num_devices} are available")
  return tuple(vals)


def make_mesh(sizes: dict, devices: Optional[Sequence] = None) -> Mesh:
  """A Mesh with axes AXES (Auto axis types) over `devices` (default: all).

  Args:
    sizes: axis sizes, -1 for the remaining devices.
    devices: devices to use.
  Returns:
    jax.sharding.Mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Devices the batch is split over."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, S] arrays: rows split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def state_sharding(mesh: Mesh):
  """A function abstract pytree -> shardings that replicates every array over the mesh.

  Args:
    mesh: the mesh.
  Returns:
    tree -> pytree of NamedSharding (the shape `init_state` and `make_train_step` take).
  """
  replicated = NamedSharding(mesh, P())
  return lambda tree: jax.tree.map(lambda _: replicated, tree)
