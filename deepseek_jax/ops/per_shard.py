"""Running an op on each device's own shard under the ambient mesh.

XLA's partitioner cannot split a custom call (a Pallas kernel) or a per-token selection it does not
understand: it gathers the operands onto every device and runs the whole computation there. Ops that are
independent across batch rows, tokens or heads say so by running inside a `jax.shard_map` over the mesh axes
the logical-axis rules give those dims (`deepseek_jax.sharding.LOGICAL_RULES`, or the active
`nn.logical_axis_rules`), where those axes divide the dim.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from deepseek_jax.sharding import LOGICAL_RULES


def ambient_mesh():
  """The mesh set by `jax.set_mesh` (abstract inside jit), or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", False) or not mesh.axis_names:
    return None
  return mesh


def mesh_devices(mesh) -> int:
  """Devices of `mesh` (1 for None)."""
  return 1 if mesh is None else int(math.prod(dict(mesh.shape).values()))


def active_rules() -> tuple:
  """The active `nn.logical_axis_rules`, else `sharding.LOGICAL_RULES`."""
  current = nn.get_logical_axis_rules()
  return tuple(current) if current else LOGICAL_RULES


def rule_axes(rules, name: str) -> tuple:
  """The mesh axes the rules map logical axis `name` to (in order)."""
  for key, value in rules:
    if key == name:
      if value is None:
        return ()
      return (value,) if isinstance(value, str) else tuple(value)
  return ()


def dividing_axes(mesh, rules, name: str, size: int) -> tuple:
  """The mesh axes of logical axis `name`, in order, while their product divides `size` (size-1, absent and
  already-manual axes skipped): the axes a dim of that size is split over."""
  shape = dict(mesh.shape)
  manual = getattr(mesh, "manual_axes", ())
  axes, n = [], 1
  for a in rule_axes(rules, name):
    if shape.get(a, 1) == 1 or a in manual:
      continue
    if size % (n * shape[a]):
      break
    axes.append(a)
    n *= shape[a]
  return tuple(axes)


def spec_entry(axes: Sequence[str]):
  """A PartitionSpec entry for a dim split over `axes` (None, one name, or a tuple)."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


def shard_map(fn: Callable, mesh, in_specs, out_specs, *args, check_vma: bool = True, axis_names=None):
  """`jax.shard_map(fn)(*args)`, resharding the operands first on a mesh with Explicit axes; with
  `axis_names` only those mesh axes are manual (XLA still partitions over the others)."""
  if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
  extra = {} if axis_names is None else {"axis_names": set(axis_names)}
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma,
                       **extra)(*args)


def summed_over_tokens(fn: Callable, *args):
  """fn(*args) for a function that sums over the leading (token) dim of every arg, e.g. a weight gradient
  x^T dy: under the ambient mesh each device sums its own tokens and the partial results are added over the
  token axes (a loop over token chunks on the global batch would make XLA gather every token first)."""
  mesh = ambient_mesh()
  if mesh_devices(mesh) == 1:
    return fn(*args)
  axes = dividing_axes(mesh, active_rules(), "activation_batch", args[0].shape[0])
  if not axes:
    return fn(*args)
  specs = tuple(P(spec_entry(axes), *(None,) * (a.ndim - 1)) for a in args)
  return shard_map(lambda *xs: jax.lax.psum(fn(*xs), axes), mesh, specs, P(), *args, check_vma=False,
                   axis_names=axes)


def per_shard(fn: Callable, args: Sequence, layouts: Sequence[str], out_layouts, *, check_vma: bool = False):
  """fn(*args) run on each device's batch rows (and heads) under the ambient mesh; fn(*args) without one.

  Args:
    fn: a function whose results are the concatenations of its results on slices of the batch dim (and of
      the heads dim): attention, per-token selection.
    args: arrays; the first has the batch dim first.
    layouts: per arg, one letter per dim: 'b' batch ('activation_batch' rule), 'h' heads
      ('activation_heads'), '.' whole (e.g. 'b.h.' for [B, S, H, D], '.' for a replicated vector).
    out_layouts: the results' layouts in the same letters (a string, or a tuple of them for a tuple).
    check_vma: the shard_map's varying-manual-axes check (Pallas calls carry none: False).
  Returns:
    fn's results, split as `out_layouts` say.
  """
  mesh = ambient_mesh()
  if mesh_devices(mesh) == 1:
    return fn(*args)
  rules = active_rules()
  lead, layout = args[0], layouts[0]
  batch = dividing_axes(mesh, rules, "activation_batch", lead.shape[layout.index("b")])
  heads = dividing_axes(mesh, rules, "activation_heads", lead.shape[layout.index("h")]) if "h" in layout else ()
  if not batch and not heads:
    return fn(*args)

  def spec(letters):
    return P(*(spec_entry(batch) if c == "b" else spec_entry(heads) if c == "h" else None for c in letters))

  outs = spec(out_layouts) if isinstance(out_layouts, str) else tuple(spec(l) for l in out_layouts)
  return shard_map(fn, mesh, tuple(spec(l) for l in layouts), outs, *args, check_vma=check_vma)
