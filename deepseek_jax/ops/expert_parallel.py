"""Expert parallelism for the routed experts: experts split over the 'expert' mesh axis, tokens travel to them.

Layout (inside one `jax.shard_map` over the whole mesh):
  tokens x [T, D], idx / weights [T, K]   split over the token axes (those of the 'activation_batch' rule that
                                          divide T; tokens are replicated over the others)
  w_gate, w_up [E, D, F], w_down [E, F, D] split over 'expert' on E (E_l = E / ep experts per device) and over
                                          the rules' 'moe_mlp' axis on F (tensor parallel); the D dim is
                                          gathered at the boundary (FSDP) and its gradient reduce-scattered.

Algorithm, per device, when tokens are split over 'expert' (the usual case):
  1. sort the T_l*K local assignments by global expert id (`kernels.dispatch.sort_by_expert`); since device j
     holds experts [j E_l, (j+1) E_l), the sorted rows are also grouped by destination device;
  2. dispatch: every device sends each destination its rows (all_to_all over 'expert'); a receiver keeps
     source i's rows in slot [i C, i C + n_i) of a [ep C, D] buffer, and learns their local expert ids from
     the exchanged per-expert counts. C = T_l * min(K, E_l) is the most rows one source can send to one
     device (a token picks K distinct experts, at most E_l of them on one device), so nothing is dropped;
  3. the received rows are sorted by local expert and run through the expert FFN (a callable on rows sorted
     by expert: by default the three grouped matmuls of `moe_dispatch.grouped_swiglu`), then unsorted back
     into their slots;
  4. the reverse exchange returns every row to its source at the place it came from;
  5. `kernels.dispatch.combine` takes each token's weighted sum over its K rows; with tensor parallelism the
     partial sums over the F shards are added (psum over the hidden axis) on the [T_l, D] result.
Collectives: `jax.lax.ragged_all_to_all` moves exactly the rows (GPU, TPU); elsewhere (XLA:CPU has no ragged
all-to-all) a dense `jax.lax.all_to_all` moves the [ep, C, D] padded buffers. Both give the same numbers.

When tokens are replicated over 'expert' (T not divisible by the token shards, e.g. one-token decoding), every
device applies its local experts to the assignments that fall on them and the outputs are summed over 'expert'.
On a mesh without an 'expert' axis (or of size 1) every device runs all experts on its own tokens: the grouped
matmul kernels are custom calls XLA cannot split, so they run here per device instead of on the gathered
batch.

Optional capacity (`capacity_factor`): C = ceil(capacity_factor * T_l * K / ep) rows per (source, destination)
pair instead of the worst case; the rows past C (in expert order) are dropped and contribute zero, and the
dropped fraction of all assignments is returned.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.dispatch import combine, permute, sort_by_expert
from deepseek_jax.ops.moe_dispatch import grouped_swiglu
from deepseek_jax.ops.per_shard import active_rules, ambient_mesh, dividing_axes, rule_axes, shard_map, spec_entry

EXPERT_AXIS = "expert"
COLLECTIVES = ("auto", "ragged", "padded", "ragged_emulated")


def expert_parallel_size(mesh=None) -> int:
  """Size of the 'expert' axis of `mesh` (default: the ambient mesh); 1 without one."""
  mesh = ambient_mesh() if mesh is None else mesh
  if mesh is None or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return int(dict(mesh.shape)[EXPERT_AXIS])


def _hidden_axes(mesh, rules, hidden: int) -> tuple:
  """Mesh axes the expert hidden width F is split over (the 'moe_mlp' rule), if they divide F."""
  shape = dict(mesh.shape)
  axes = tuple(a for a in rule_axes(rules, "moe_mlp") if a in shape and shape[a] > 1)
  if axes and hidden % math.prod(shape[a] for a in axes) == 0:
    return axes
  return ()


def _a2a(x, tiled=True):
  return jax.lax.all_to_all(x, EXPERT_AXIS, 0, 0, tiled=tiled)


def _varying_zeros(shape, dtype):
  """Zeros typed as varying over 'expert': a ragged all-to-all's result takes its `output` buffer's type,
  and each device's result differs."""
  z = jnp.zeros(shape, dtype)
  try:
    return jax.lax.pcast(z, EXPERT_AXIS, to="varying")
  except (TypeError, ValueError):  # already varying, or no type checking (check_vma=False)
    return z


def _ragged_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                     max_rows: int):
  """`jax.lax.ragged_all_to_all` over 'expert' (one slice per peer) built from a dense all_to_all.

  Every slice must have at most `max_rows` rows. Used where the backend lacks the ragged collective, and to
  check the ragged bookkeeping on CPU.
  """
  p = jnp.arange(max_rows, dtype=jnp.int32)
  src = input_offsets[:, None] + p[None]                                  # [ep, max_rows]
  valid = p[None] < send_sizes[:, None]
  buf = jnp.where(valid[..., None], jnp.take(operand, jnp.where(valid, src, 0), axis=0), 0)
  recv = _a2a(buf, tiled=False)                                           # [ep, max_rows, D]
  offsets_here = _a2a(output_offsets)                                     # where each source writes here
  dst = offsets_here[:, None] + p[None]
  dst = jnp.where(p[None] < recv_sizes[:, None], dst, output.shape[0])    # out of bounds: not written
  return output.at[dst.reshape(-1)].set(recv.reshape((-1,) + recv.shape[2:]), mode="drop")


def _local_dispatch(x, idx, weights, w_gate, w_up, w_down, *, num_experts, hidden_axes, expert_ffn,
                    collective, capacity_factor):
  """Per-device body when tokens are split over 'expert' (steps 1-5 of the module docstring)."""
  t, k = idx.shape
  e_local = w_gate.shape[0]
  ep = num_experts // e_local
  me = jax.lax.axis_index(EXPERT_AXIS)
  worst = t * min(k, e_local)
  if capacity_factor is None:
    cap = worst
  else:
    cap = max(1, min(worst, math.ceil(capacity_factor * t * k / ep)))

  # 1. sort by global expert: rows grouped by destination device.
  order, group_sizes, inverse = sort_by_expert(idx, num_experts=num_experts)
  counts = group_sizes.reshape(ep, e_local)                               # [dest, local expert]
  send_full = counts.sum(-1)
  send_off = jnp.cumsum(send_full) - send_full
  # With a capacity only the first `cap` rows of each destination's chunk (in expert order) are sent.
  sent_cum = jnp.minimum(jnp.cumsum(counts, axis=-1), cap)
  sent_counts = jnp.diff(sent_cum, axis=-1, prepend=0)
  send = sent_counts.sum(-1)
  dropped = (send_full - send).sum()

  # 2. dispatch into the slot layout [ep * cap, D] (source i's rows at i * cap).
  recv_counts = _a2a(sent_counts)                                         # [source, local expert]
  recv = recv_counts.sum(-1)
  slot = jnp.arange(cap, dtype=jnp.int32)
  if collective == "padded":
    rows = send_off[:, None] + slot[None]                                 # sorted row of (dest, slot)
    valid = slot[None] < send[:, None]
    tok = jnp.take(order, jnp.where(valid, rows, 0)) // k
    buf = jnp.where(valid[..., None], jnp.take(x, tok, axis=0), 0).astype(x.dtype)
    x_slots = _a2a(buf, tiled=False).reshape(ep * cap, -1)
  else:
    xs = permute(x, order, k)                                             # [T*K, D] sorted
    ragged = (jax.lax.ragged_all_to_all if collective == "ragged"
              else lambda *a, **kw: _ragged_emulated(*a, max_rows=cap))
    out_off = jnp.full((ep,), me * cap, jnp.int32)
    x_slots = ragged(xs, _varying_zeros((ep * cap, x.shape[1]), x.dtype), send_off.astype(jnp.int32),
                     send.astype(jnp.int32), out_off, recv.astype(jnp.int32), axis_name=EXPERT_AXIS)

  # Local expert id of every slot: source i's rows arrive sorted by expert; e_local marks empty slots.
  cum = jnp.cumsum(recv_counts, axis=-1)                                  # [source, local expert]
  local_ids = jax.vmap(lambda c: jnp.searchsorted(c, slot, side="right"))(cum).reshape(-1)

  # 3. local grouped matmuls over the received rows sorted by local expert (empty slots sort last).
  l_order, l_sizes, l_inverse = sort_by_expert(local_ids[:, None], num_experts=e_local)
  ys = expert_ffn(permute(x_slots, l_order, 1), l_sizes, w_gate, w_up, w_down)
  y_slots = jnp.take(ys, l_inverse, axis=0)                               # [ep * cap, D]

  # 4. return every row to its source, at its sorted position there.
  if collective == "padded":
    back = _a2a(y_slots.reshape(ep, cap, -1), tiled=False)                # [dest, slot, D] on the source
    sorted_eid = jnp.take(idx.reshape(-1), order)
    dest = sorted_eid // e_local
    pos = jnp.arange(t * k, dtype=jnp.int32) - jnp.take(send_off, dest)
    keep = pos < cap
    y_sorted = jnp.where(keep[:, None], back[dest, jnp.where(keep, pos, 0)], 0).astype(x.dtype)
  else:
    src_off = _a2a(send_off.astype(jnp.int32))                            # source i's offset of my chunk
    y_sorted = ragged(y_slots, _varying_zeros((t * k, x.shape[1]), x.dtype),
                      (jnp.arange(ep, dtype=jnp.int32) * cap), recv.astype(jnp.int32), src_off,
                      send.astype(jnp.int32), axis_name=EXPERT_AXIS)

  # 5. weighted sum over each token's K rows; partial sums over the F shards.
  y = combine(y_sorted, inverse, weights)
  if hidden_axes:
    y = jax.lax.psum(y, hidden_axes)
  return y, dropped


def _local_replicated(x, idx, weights, w_gate, w_up, w_down, *, num_experts, hidden_axes, expert_ffn,
                      expert_axis=EXPERT_AXIS):
  """Per-device body when tokens are replicated over 'expert': local experts only, summed over 'expert'
  (with `expert_axis` None every expert is local)."""
  e_local = w_gate.shape[0]
  me = jax.lax.axis_index(expert_axis) if expert_axis else 0
  local = idx - me * e_local
  mine = (local >= 0) & (local < e_local)
  order, group_sizes, inverse = sort_by_expert(jnp.where(mine, local, e_local),
                                               num_experts=e_local)
  ys = expert_ffn(permute(x, order, idx.shape[1]), group_sizes, w_gate, w_up, w_down)
  y = combine(ys, inverse, jnp.where(mine, weights, 0))
  summed = ((expert_axis,) if expert_axis else ()) + tuple(hidden_axes)
  return (jax.lax.psum(y, summed) if summed else y), jnp.zeros((), jnp.int32)


def expert_parallel_experts(x, idx, weights, w_gate, w_up, w_down, *,
                            expert_ffn: Callable = grouped_swiglu, check_vma: bool = True, mesh=None,
                            rules: Optional[Sequence] = None, collective: str = "auto",
                            capacity_factor: Optional[float] = None, return_dropped: bool = False):
  """The routed experts' output with the experts split over the 'expert' mesh axis (see module docstring).

  Computes the same function as `deepseek_jax.layers.moe.routed_experts`:
  y[t] = sum_k weights[t, k] * expert_{idx[t, k]}(x[t]), dropless unless `capacity_factor` is given.

  Args:
    x: [T, D] tokens in the compute dtype.
    idx, weights: [T, K] expert ids and gate weights.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    expert_ffn: `expert_ffn(xs, group_sizes, w_gate, w_up, w_down) -> ys`, the experts on each device's
      rows sorted by local expert (group_sizes rows of each; rows past them must give 0): default
      `moe_dispatch.grouped_swiglu` (ragged_dot); `layers.moe` passes its impl and the FP8 recipe.
    check_vma: check the varying-manual-axes types inside the shard_map (Pallas calls carry none: False).
    mesh: the mesh (Mesh or AbstractMesh); default the ambient one (`jax.set_mesh`).
    rules: logical-axis rules; default the active `nn.logical_axis_rules`, else `sharding.LOGICAL_RULES`.
    collective: 'auto' (ragged all-to-all on GPU / TPU, padded elsewhere) | 'ragged' | 'padded' |
      'ragged_emulated' (the ragged bookkeeping over a dense all_to_all).
    capacity_factor: None (dropless) or rows per (source, destination) pair as a multiple of the balanced
      share T_l * K / ep; assignments past it are dropped.
    return_dropped: also return the dropped fraction of all T * K assignments (float32 scalar, global).
  Returns:
    y [T, D] in x's dtype, or (y, dropped_fraction) with `return_dropped`.
  Raises:
    ValueError: no mesh, E not divisible by the 'expert' axis, or a bad `collective`.
  """
  mesh = ambient_mesh() if mesh is None else mesh
  if mesh is None:
    raise ValueError("expert_parallel_experts needs a mesh (pass mesh= or call under jax.set_mesh)")
  ep = expert_parallel_size(mesh)
  num_experts, _, hidden = w_gate.shape
  if num_experts % ep:
    raise ValueError(f"n_routed_experts={num_experts} is not divisible by the expert mesh axis ({ep})")
  if collective not in COLLECTIVES:
    raise ValueError(f"collective={collective!r}: expected one of {COLLECTIVES}")
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r} must be positive or None")
  if collective == "auto":
    collective = "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"
  rules = active_rules() if rules is None else tuple(rules)
  t = x.shape[0]
  token_axes = dividing_axes(mesh, rules, "activation_batch", t)
  hidden_axes = _hidden_axes(mesh, rules, hidden)
  tok = P(spec_entry(token_axes), None)
  w_in = P(EXPERT_AXIS, None, spec_entry(hidden_axes))
  w_out = P(EXPERT_AXIS, spec_entry(hidden_axes), None)
  split = EXPERT_AXIS in token_axes

  def body(x, idx, weights, w_gate, w_up, w_down):
    if split:
      y, dropped = _local_dispatch(x, idx, weights, w_gate, w_up, w_down, num_experts=num_experts,
                                   hidden_axes=hidden_axes, expert_ffn=expert_ffn,
                                   collective=collective, capacity_factor=capacity_factor)
    else:
      y, dropped = _local_replicated(x, idx, weights, w_gate, w_up, w_down, num_experts=num_experts,
                                     hidden_axes=hidden_axes, expert_ffn=expert_ffn,
                                     expert_axis=EXPERT_AXIS if ep > 1 else None)
    if token_axes:
      dropped = jax.lax.psum(dropped, token_axes)
    return y, dropped.astype(jnp.float32)

  args = (x, idx, weights, w_gate, w_up, w_down)
  specs = (tok, tok, tok, w_in, w_in, w_out)
  # Pallas calls carry no varying-manual-axes types, so the caller turns the check off for them.
  y, dropped = shard_map(body, mesh, specs, (tok, P()), *args, check_vma=check_vma)
  if return_dropped:
    return y, dropped / (t * idx.shape[1])
  return y
