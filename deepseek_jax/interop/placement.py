"""Where each variable of a model goes on a device mesh: shardings from the parameters' logical axis names.

The model annotates every parameter with logical axis names (`nn.with_logical_partitioning`); a rules table
maps them to mesh axes.  `variable_shardings` evaluates the boxed init abstractly (no array is created), takes
`nn.get_partition_spec` of it and resolves the names with the rules, dropping a mesh axis from any dimension it
does not divide (that dimension is then replicated) and any rule whose mesh axis the mesh lacks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import ModelConfig

# Logical parameter axis -> mesh axis ('data', 'fsdp', 'expert', 'tensor'), used when the caller gives no
# rules and deepseek_jax.sharding provides none: experts over 'expert', the model width over 'fsdp', heads
# and hidden widths over 'tensor'; latent ranks and per-head dims stay whole.
DEFAULT_RULES: tuple = (
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("expert_gate", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("qk_dim", None),
    ("kv_dim", None),
    ("v_dim", None),
    ("mtp_concat", None),
    ("norm", None),
)


def default_rules() -> tuple:
  """`deepseek_jax.sharding.LOGICAL_RULES` when that module defines it, else `DEFAULT_RULES`."""
  try:
    from deepseek_jax import sharding  # pylint: disable=g-import-not-at-top
  except ImportError:
    return DEFAULT_RULES
  return tuple(getattr(sharding, "LOGICAL_RULES", DEFAULT_RULES))


def boxed_abstract_variables(cfg: ModelConfig):
  """The model's variables with their logical-partitioning boxes, as shapes only (jax.eval_shape)."""
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  model = DeepSeekV3(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), tokens))


def abstract_variables(cfg: ModelConfig):
  """`DeepSeekV3(cfg).init`'s tree (plain arrays) as jax.ShapeDtypeStruct leaves."""
  return nn.unbox(boxed_abstract_variables(cfg))


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """spec with mesh axes removed from dimensions they do not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in names:
      if dim % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def variable_shardings(cfg: ModelConfig, mesh: Mesh, rules: Optional[Sequence] = None):
  """A NamedSharding for every variable of `DeepSeekV3(cfg)` (same tree as `init`).

  Args:
    cfg: the model.
    mesh: the device mesh.
    rules: (logical name, mesh axis or None) pairs; None takes `default_rules()`.
  Returns:
    A tree of NamedSharding with the structure of the model's variables.
  """
  rules = default_rules() if rules is None else tuple(rules)
  names = set(mesh.axis_names)

  def keep(axis):
    if axis is None:
      return None
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    axes = tuple(a for a in axes if a in names)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  rules = tuple((logical, keep(axis)) for logical, axis in rules)
  boxed = boxed_abstract_variables(cfg)
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  mesh_specs = jax.tree_util.tree_map(
      lambda s: nn.logical_to_mesh_axes(s, rules), specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))
