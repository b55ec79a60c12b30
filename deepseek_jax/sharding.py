"""Meshes, the logical-axis rules, and shardings for parameters and activations.

Model code names logical axes only ('embed', 'heads', 'expert', ...).  One rules table maps them onto the
physical mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  expert parallelism: routed experts split across devices, tokens travel to them
  tensor  tensor parallelism: attention heads and MLP / expert hidden widths split
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The data-parallel axes: a batch's rows split over all three (expert-parallel devices see different tokens).
BATCH_AXES = ("data", "fsdp", "expert")
# ZeRO-1 (`config.zero1`): the optimizer state is split over the data replicas as well.
ZERO1_AXES = ("data",)

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_exp_tokens", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("expert", "expert"),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("qk_dim", None),
    ("kv_dim", None),
    ("v_dim", None),
    ("expert_gate", None),
    ("mtp_concat", None),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned blocks (ModelConfig.scan_layers)
)


class MeshError(ValueError):
  """A mesh that does not fit the devices."""


def mesh_shape(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> dict:
  """Resolves the sizes of the four mesh axes; one of them may be -1 (all remaining devices).

  Args:
    data, fsdp, expert, tensor: axis sizes (positive, or -1 for one of them).
    num_devices: devices to cover (default: `jax.device_count()`).
  Returns:
    {'data', 'fsdp', 'expert', 'tensor'} -> size, the product being the device count.
  Raises:
    MeshError naming the sizes when their product does not equal the device count.
  """
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
  for k, v in sizes.items():
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v == 0 or v < -1:
      raise MeshError(f"mesh.{k}={v!r} must be a positive integer or -1")
  sizes = {k: int(v) for k, v in sizes.items()}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise MeshError(f"mesh: only one axis may be -1, got {sizes}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise MeshError(f"mesh {sizes} does not fit {n} devices: {n} is not divisible by the fixed axes' "
                      f"{fixed}")
    sizes[free[0]] = n // fixed
  elif fixed != n:
    raise MeshError(f"mesh {sizes} needs {fixed} devices but {n} are available")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A `Mesh` over (data, fsdp, expert, tensor) with Auto axis types.

  `jax.make_mesh` orders the devices for the hardware's topology and keeps each process's devices
  contiguous, so that a process holds one block of rows of a batch split over the leading axes (what
  `deepseek_jax.distributed.global_batch_from_local` relies on).

  Args:
    data, fsdp, expert, tensor: axis sizes; one may be -1 (the remaining devices).
    devices: the devices to use (default: all devices of all processes).
  Returns:
    jax.sharding.Mesh with axis names MESH_AXES.
  Raises:
    MeshError: sizes that do not match the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(data, fsdp, expert, tensor, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def boxed_abstract_variables(model: nn.Module, *init_args):
  """Abstract (ShapeDtypeStruct) variables with their `nn.Partitioned` logical-axis boxes."""
  return jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), *init_args))


def logical_axes(model: nn.Module, *init_args):
  """PartitionSpecs of logical axis names for every variable `model.init(rng, *init_args)` makes."""
  return nn.get_partition_spec(boxed_abstract_variables(model, *init_args))


def logical_to_mesh(specs, rules: Sequence = LOGICAL_RULES, mesh: Mesh | None = None):
  """Maps logical PartitionSpecs to mesh-axis PartitionSpecs, dropping mesh axes of size 1."""
  rules = tuple(rules)
  if mesh is not None:
    rules = tuple((k, _drop_trivial(v, mesh)) for k, v in rules)
  return nn.logical_to_mesh(specs, rules)


def _drop_trivial(v, mesh):
  if v is None:
    return None
  axes = (v,) if isinstance(v, str) else tuple(v)
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """`spec` with mesh axes removed from the dims they do not divide (e.g. 3 heads on 2 devices).

  A dim split over several mesh axes keeps, in order, each axis that still divides it together with the
  ones kept before (a batch of 4 over data=2 x fsdp=2 x expert=2 stays split over data x fsdp) instead of
  being replicated whole; a mesh axis the mesh lacks, or of size 1, is dropped.

  Args:
    spec: a PartitionSpec of mesh axes (entries: None, an axis name or a tuple of them).
    shape: the array's shape.
    mesh: the mesh (anything with a `.shape` mapping axis -> size).
  Returns:
    A PartitionSpec of len(shape) entries that evenly divides `shape`.
  """
  sizes = dict(mesh.shape)
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  if len(entries) > len(shape):
    raise ValueError(f"PartitionSpec {spec} has more entries than the shape {tuple(shape)} has dims")
  out = []
  for dim, axes in zip(shape, entries):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in names:
      n = sizes.get(a, 1)
      if n > 1 and dim % (size * n) == 0:
        kept.append(a)
        size *= n
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def variable_shardings(model: nn.Module, mesh: Mesh, *init_args, rules: Sequence = LOGICAL_RULES):
  """NamedShardings for every variable of `model` on `mesh`, from the logical rules."""
  abstract = boxed_abstract_variables(model, *init_args)
  specs = logical_to_mesh(nn.get_partition_spec(abstract), rules, mesh)
  shapes = nn.unbox(abstract)
  return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)), specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def data_sharding(mesh: Mesh, rules: Sequence = LOGICAL_RULES) -> NamedSharding:
  """Sharding of a [batch, seq] token batch: batch over the data-parallel axes."""
  spec = logical_to_mesh(PartitionSpec("activation_batch", "activation_length"), rules, mesh)
  return NamedSharding(mesh, spec)


def rules_context(rules: Sequence = LOGICAL_RULES, mesh: Mesh | None = None):
  """Context for activation constraints (`nn.with_logical_constraint`) inside the model."""
  rules = tuple(rules)
  if mesh is not None:
    rules = tuple((k, _drop_trivial(v, mesh)) for k, v in rules)
  return nn.logical_axis_rules(rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence = LOGICAL_RULES):
  """`jax.set_mesh(mesh)` together with `rules_context(rules, mesh)`: where to trace a model on `mesh`.

  The ambient mesh makes the MoE layers take the expert-parallel path (`ops.expert_parallel` reads
  `jax.sharding.get_abstract_mesh()`); the rules make the model's `nn.with_logical_constraint` calls
  effective.  Without either the computation is still correct, only not expert-parallel.

  Args:
    mesh: the device mesh.
    rules: logical-axis rules.
  Yields:
    the mesh.
  """
  with jax.set_mesh(mesh), rules_context(rules, mesh):
    yield mesh


def _add_axes(spec: PartitionSpec, shape, mesh: Mesh, axes: Sequence[str]) -> PartitionSpec:
  """`spec` with `axes` added to the first dim that is unsharded and divisible by their product."""
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  used = {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}
  axes = tuple(a for a in axes if a not in used)
  if not axes:
    return spec
  size = math.prod(mesh.shape[a] for a in axes)
  entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
  for i, (dim, entry) in enumerate(zip(shape, entries)):
    if entry is None and dim % size == 0:
      entries[i] = axes[0] if len(axes) == 1 else axes
      return PartitionSpec(*entries)
  return spec


def train_state_sharding(model: nn.Module, mesh: Mesh, rules: Sequence = LOGICAL_RULES, *,
                         zero1_axes: Sequence[str] = ()):
  """A function abstract train state -> shardings that lays every array out by the logical rules.

  Parameters and the router state take `variable_shardings`; every other leaf whose path ends with a
  parameter's path and has its shape (the optimizer's moments, e.g. `opt_state[...].mu['layers_3']...`) takes
  that parameter's sharding, optionally further split over `zero1_axes` (ZeRO-1: optimizer state sharded over
  the data-parallel replicas, parameters not); everything else (step counters, rng) is replicated. This is
  the function `deepseek_jax.training.state.init_state(sharding=...)` and the train step take.

  Args:
    model: the model (its logical axes come from an abstract init on a [1, 1] token batch).
    mesh: the device mesh.
    rules: logical-axis rules.
    zero1_axes: mesh axes to split the optimizer-state copies over as well (e.g. ('data',)).
  Returns:
    fn(abstract_tree) -> pytree of NamedSharding of the same structure.
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  var_shardings = variable_shardings(model, mesh, tokens, rules=rules)
  shapes = nn.unbox(boxed_abstract_variables(model, tokens))
  table = {}
  for collection in var_shardings:
    for (path, s), leaf in zip(jax.tree_util.tree_leaves_with_path(var_shardings[collection]),
                               jax.tree.leaves(shapes[collection])):
      table[tuple(path)] = (s.spec, tuple(leaf.shape))
  replicated = NamedSharding(mesh, PartitionSpec())

  def lookup(path, leaf):
    path = tuple(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for start in range(len(path)):
      hit = table.get(path[start:])
      if hit is None or hit[1] != shape:
        continue
      spec = hit[0]
      owner = path[start - 1] if start else None
      is_variable = getattr(owner, "name", getattr(owner, "key", None)) in ("params", "router")
      if zero1_axes and not is_variable:
        spec = _add_axes(spec, shape, mesh, zero1_axes)
      return NamedSharding(mesh, spec)
    return replicated

  def fn(tree):
    return jax.tree_util.tree_map_with_path(lookup, tree)

  return fn
