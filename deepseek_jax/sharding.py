"""Meshes, the logical-axis rules, and shardings for parameters and activations.

Model code names logical axes only ('embed', 'heads', 'expert', ...).  One rules table maps them onto the
physical mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  expert parallelism: routed experts split across devices, tokens travel to them
  tensor  tensor parallelism: attention heads and MLP / expert hidden widths split
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
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
)


class MeshError(ValueError):
  """A mesh that does not fit the devices."""


def mesh_shape(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> dict:
  """Resolves the sizes of the four mesh axes; one of them may be -1 (all remaining devices).

  Raises:
    MeshError naming the sizes when their product does not equal the device count.
  """
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise MeshError(f"mesh: only one axis may be -1, got {sizes}")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise MeshError(f"mesh.{k}={v} must be positive or -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise MeshError(f"mesh {sizes} does not fit {n} devices: {n} is not divisible by {fixed}")
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {n} are available")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A `Mesh` over (data, fsdp, expert, tensor) with Auto axis types."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(data, fsdp, expert, tensor, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


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
  """Replicates the dims of `spec` whose size does not divide by their mesh axes (e.g. 3 heads on 2)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if dim % size == 0 else None)
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


def init_sharded(model: nn.Module, mesh: Mesh, rng, tokens, rules: Sequence = LOGICAL_RULES):
  """`model.init` compiled with out_shardings from the rules: parameters are born on their shards."""
  shardings = variable_shardings(model, mesh, tokens, rules=rules)
  with rules_context(rules, mesh):
    return jax.jit(model.init, out_shardings=shardings)(rng, tokens)


def shard_like(tree, shardings):
  """jax.device_put of a host tree onto matching shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), tree, shardings)


def describe(shardings: Mapping) -> str:
  """One line per variable: path and PartitionSpec (for logs)."""
  lines = []
  for path, s in jax.tree_util.tree_leaves_with_path(shardings):
    lines.append(f"{jax.tree_util.keystr(path)}: {s.spec}")
  return "\n".join(lines)


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
