"""Routed-expert computation of a DeepSeekMoE layer: the dispatch implementations.

All compute y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]) with expert(x) = (silu(x Wg) * (x Wu)) Wd, dropless:
- 'dense': every expert on every token, combined through a [T, E] weight matrix (the reference).
- 'host' (CPU default where it builds): the SwiGLU FFN as an XLA FFI custom call over the host's BLAS,
  one single-threaded sgemm per (expert, row tile) on XLA's thread pool (`kernels.host_moe`); float32,
  one device.
- 'blocked' (CPU fallback): each expert's rows padded to a block multiple, one batched matmul over blocks.
- 'xla': sort the T*K (token, expert) assignments by expert, grouped matmuls with `jax.lax.ragged_dot`
  over the contiguous groups, unsort, weighted sum over K.
- 'pallas': the same with the Pallas `kernels.grouped_matmul.gmm`.
`capacity_experts` (fixed capacity per expert, drops the overflow) is there for comparison only.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import host_build, host_moe
from kernels.dispatch import combine, permute, sort_by_expert, take_rows
from deepseek_jax.ops.backend import on_gpu, resolve
from deepseek_jax.ops.grouped_matmul import grouped_matmul


def dense_experts(x, idx, weights, w_gate, w_up, w_down):
  """Every expert on every token (the reference)."""
  e = w_gate.shape[0]
  h = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x, w_gate)) * jnp.einsum("TD,EDF->TEF", x, w_up)
  y = jnp.einsum("TEF,EFD->TED", h, w_down)
  dense_w = jnp.zeros((x.shape[0], e), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
  return jnp.einsum("TED,TE->TD", y, dense_w.astype(x.dtype))


def sorted_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str):
  """Sort by expert, three grouped matmuls, unsort and combine (impl 'xla' or 'pallas')."""
  k = idx.shape[1]
  order, group_sizes, inverse = sort_by_expert(idx, num_experts=w_gate.shape[0])
  xs = permute(x, order, k)                                               # [T*K, D]
  xs = nn.with_logical_constraint(xs, ("activation_exp_tokens", "activation_embed"))
  h = (jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes, impl=impl))
       * grouped_matmul(xs, w_up, group_sizes, impl=impl))
  ys = grouped_matmul(h.astype(x.dtype), w_down, group_sizes, impl=impl)
  return combine(ys, inverse, weights)


def block_size_for(rows: int, num_experts: int) -> int:
  """Rows per block of the blocked dispatch: 128, the smallest power of two >= rows (at least 8) if that is
  less, halved while the padding bound num_experts x (block - 1) exceeds 8 x rows (few tokens over many
  experts, e.g. decoding).

  XLA:CPU spends about the same time per block on blocks of up to 128 rows, so fewer and fuller blocks win
  even at twice the rows: fwd + bwd at T=2048, E=64, K=2 takes 185 ms with 16-row blocks, 101 ms with 64,
  87 ms with 128 and 132 ms with 256.
  """
  block = min(128, max(8, 1 << max(rows - 1, 0).bit_length()))
  while block > 8 and num_experts * (block - 1) > 8 * rows:
    block //= 2
  return int(block)


def blocked_layout(idx, num_experts: int, block: int):
  """Slots of the blocked layout: each expert's rows padded to a multiple of `block`.

  Returns:
    slot_token [P] token of each padded slot (T for padding), slot_valid [P] bool, block_expert [P/block]
    expert of each block, assignment_slot [T*K] the slot holding each flat (token, k) assignment, and
    slot_assignment [P] the flat assignment in each slot (0 for padding).
    P = ceil((T*K + E*(block-1)) / block) * block is static: no assignment is ever dropped.
  """
  t, k = idx.shape
  rows = t * k
  num_blocks = -(-(rows + num_experts * (block - 1)) // block)
  p = num_blocks * block
  order, group_sizes, inverse = sort_by_expert(idx, num_experts=num_experts)
  group_start = jnp.cumsum(group_sizes) - group_sizes
  padded = (group_sizes + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  sorted_expert = idx.reshape(-1)[order]
  sorted_slot = padded_start[sorted_expert] + jnp.arange(rows, dtype=jnp.int32) - group_start[sorted_expert]
  slot_token = jnp.full((p,), t, jnp.int32).at[sorted_slot].set(order // k)
  slot_valid = jnp.zeros((p,), bool).at[sorted_slot].set(True)
  block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks, dtype=jnp.int32) * block,
                                  side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)
  assignment_slot = jnp.take(sorted_slot, inverse)
  slot_assignment = jnp.zeros((p,), jnp.int32).at[sorted_slot].set(order)
  return slot_token, slot_valid, block_expert, assignment_slot, slot_assignment


def swiglu_blocks(xb, per_block, w_gate, w_up, w_down):
  """(silu(x Wg) * (x Wu)) Wd on blocks xb [N, B, D]; `per_block(w)` gives each block's weights [N, I, O].

  Gate and up run as one product against [Wg | Wu] ([N, D, 2F]): one weight gather and one batched matmul
  twice as wide, which XLA:CPU runs at close to twice the FLOP rate of two narrow ones.
  """
  gu = jnp.einsum("NBD,NDG->NBG", xb, per_block(jnp.concatenate([w_gate, w_up], axis=-1)))
  g, u = jnp.split(gu, 2, axis=-1)
  return jnp.einsum("NBF,NFD->NBD", (jax.nn.silu(g) * u).astype(xb.dtype), per_block(w_down))


# The blocked layout's gathered operands (token rows in slots, each block's expert weights) are regathered in
# the backward pass instead of kept: a gather is cheap, and the per-block weights are N x D x 2F, more than
# the expert weights themselves.  Train step of the scanned `small` preset (batch 8 x 1024): 14.1 -> 10.6 GB
# of XLA temporaries; the unrolled step 14.3 -> 14.0 GB; step time unchanged on CPU.
GATHERED = "moe_blocked_gathered"


def _all_but_gathered(prim, *_, **params) -> bool:
  """Remat policy: save every intermediate except the gathered operands, the gathers producing them (plain or
  custom-VJP) and reshapes (`save_anything_except_these_names` alone would save the same values under their
  producers)."""
  if prim.name == "name":
    return params.get("name") != GATHERED
  return prim.name not in ("gather", "custom_vjp_call", "reshape")


def chains_for(num_blocks: int, block: int) -> int:
  """Independent block ranges of the blocked dispatch: `BLOCK_CHAINS`, but at most one per block and per
  `MIN_CHAIN_ROWS` slot rows (a decoding step's few blocks run as one chain: the extra ops cost more than
  the concurrency buys there)."""
  return max(1, min(BLOCK_CHAINS, num_blocks, num_blocks * block // MIN_CHAIN_ROWS))


# The blocked experts run as this many independent chains (gathers, batched matmuls, activations) over
# contiguous ranges of blocks.  XLA:CPU parallelises one batched matmul of 128-row blocks poorly (Eigen runs
# it on one thread, YNN at about 1.3x that on two), while its thunk executor runs independent ops on idle
# threads.  MoE fwd + bwd at T2048 E16 K4 on 2 cores: 2 chains 1.15x, 4 chains 1.28x, 8 chains 1.30x.
BLOCK_CHAINS = 4
MIN_CHAIN_ROWS = 1024


def blocked_experts(x, idx, weights, w_gate, w_up, w_down, *, block: int | None = None,
                    block_ffn=swiglu_blocks, chains: int | None = None):
  """Dropless experts as batched matmuls over blocks of one expert each (the CPU default).

  `jax.lax.ragged_dot` on CPU computes every group for every row; here each expert's rows are padded to a
  multiple of `block` and every block multiplies by its own expert's weights, so the work is the routed
  rows plus at most E x (block - 1) padding rows.  The blocks go in `chains` contiguous ranges, each its
  own gathers and matmuls, which XLA:CPU runs concurrently.

  Args:
    x, idx, weights, w_gate, w_up, w_down: as `routed_experts`.
    block: rows per block (default `block_size_for`).
    block_ffn: the expert FFN on blocks, `block_ffn(xb [N,B,D], per_block, w_gate, w_up, w_down)` ->
      [N,B,D] (default `swiglu_blocks`; the FP8 recipe passes its own GEMMs).
    chains: independent block ranges (default `chains_for(num_blocks, block)`).
  """
  e = w_gate.shape[0]
  t, k = idx.shape
  d = x.shape[1]
  block = block or block_size_for(t * k, e)
  layout = jax.lax.stop_gradient(blocked_layout(idx, e, block))
  num_blocks = layout[2].shape[0]
  n = chains or chains_for(num_blocks, block)
  cuts = [num_blocks * i // n for i in range(n + 1)]
  ranges = tuple((a * block, b * block) for a, b in zip(cuts[:-1], cuts[1:]) if b > a)

  def experts(x, w_gate, w_up, w_down, layout):
    slot_token, slot_valid, block_expert, assignment_slot, slot_assignment = layout
    ybs = []
    for xb, (a, b) in zip(_to_slots(x, slot_token, assignment_slot, k, ranges), ranges):
      expert = block_expert[a // block:b // block]
      per_block = lambda w, expert=expert: checkpoint_name(_per_block(w, expert), GATHERED)
      xb = checkpoint_name(xb.reshape(-1, block, d), GATHERED)
      ybs.append(block_ffn(xb, per_block, w_gate, w_up, w_down).reshape(-1, d))
    return _from_slots(tuple(ybs), assignment_slot, slot_assignment, slot_valid, ranges).reshape(t, k, -1)

  if block_ffn is swiglu_blocks:   # (another block_ffn may have custom VJPs that are not gathers)
    experts = jax.checkpoint(experts, policy=_all_but_gathered)
  y = experts(x, w_gate, w_up, w_down, layout)
  return jnp.einsum("TKD,TK->TD", y, weights.astype(y.dtype))


def capacity_experts(x, idx, weights, w_gate, w_up, w_down, *, capacity_factor: float):
  """Experts with a fixed capacity C = ceil(capacity_factor * T * K / E) rows each (GShard-style).

  Assignments beyond an expert's capacity (in token order) are dropped: their contribution is 0.  Opt-in,
  for comparison with the dropless paths.

  Returns:
    (y [T, D], dropped_fraction scalar).
  """
  e = w_gate.shape[0]
  t, k = idx.shape
  cap = max(1, -(-int(capacity_factor * t * k) // e))
  flat = idx.reshape(-1)
  onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)                      # [T*K, E]
  position = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1   # rank within the expert
  kept = position < cap
  slot = jnp.where(kept, flat * cap + position, e * cap)                 # e * cap: a discard slot
  p = e * cap + 1
  slot_assignment = jnp.zeros((p,), jnp.int32).at[slot].set(jnp.arange(t * k, dtype=jnp.int32))
  slot_valid = jnp.zeros((p,), bool).at[slot].set(kept)
  slot_token = jnp.where(slot_valid, slot_assignment // k, t)
  assignment_slot = slot
  layout = jax.lax.stop_gradient((slot_token, slot_valid, assignment_slot, slot_assignment))
  slot_token, slot_valid, assignment_slot, slot_assignment = layout
  xs = _to_slots(x, slot_token, assignment_slot, k, ((0, p),))[0][:e * cap].reshape(e, cap, -1)
  h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", xs, w_gate)) * jnp.einsum("ECD,EDF->ECF", xs, w_up)
  ys = jnp.einsum("ECF,EFD->ECD", h, w_down).reshape(e * cap, -1)
  ys = jnp.concatenate([ys, jnp.zeros((1, ys.shape[1]), ys.dtype)], axis=0)
  y = _from_slots((ys,), assignment_slot, slot_assignment, slot_valid, ((0, p),)).reshape(t, k, -1)
  out = jnp.einsum("TKD,TK->TD", y, (weights * kept.reshape(t, k)).astype(y.dtype))
  return out, 1.0 - jnp.mean(kept.astype(jnp.float32))


# Each block's expert weights: a gather forward; the transpose (each expert's weight gradient summed over
# its blocks) is a one-hot matmul rather than XLA's scatter-add, which is slow on CPU.
@jax.custom_vjp
def _per_block(w, block_expert):
  """w [E, I, O] -> [N, I, O], block n getting w[block_expert[n]]."""
  return take_rows(w, block_expert)


def _per_block_fwd(w, block_expert):
  return _per_block(w, block_expert), jax.nn.one_hot(block_expert, w.shape[0], dtype=w.dtype)


def _per_block_bwd(onehot, g):
  return jnp.einsum("NE,NIO->EIO", onehot, g).astype(g.dtype), None


_per_block.defvjp(_per_block_fwd, _per_block_bwd)


# Both directions of the slot permutation are gathers: the transpose of a gather by a (padded) permutation
# is a gather by the inverse permutation, which avoids XLA's scatter-add on CPU.  The slots come and go as
# the chains' ranges of slots, [(start, end), ...] covering all P in order.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _to_slots(x, slot_token, assignment_slot, k, ranges):
  """x [T, D] -> one [end - start, D] array per range of slots: row slot_token[p] in each valid slot, 0 in
  padding slots (slot_token T: a zero row appended to x, so that the padding costs no separate select)."""
  padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
  return tuple(take_rows(padded, slot_token[a:b]) for a, b in ranges)


def _to_slots_fwd(x, slot_token, assignment_slot, k, ranges):
  return _to_slots(x, slot_token, assignment_slot, k, ranges), assignment_slot


def _to_slots_bwd(k, ranges, assignment_slot, g):
  t = assignment_slot.shape[0] // k
  g = jnp.concatenate(g, axis=0) if len(g) > 1 else g[0]
  return take_rows(g, assignment_slot).reshape(t, k, -1).sum(1), None, None


_to_slots.defvjp(_to_slots_fwd, _to_slots_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _from_slots(ybs, assignment_slot, slot_assignment, slot_valid, ranges):
  """The rows of each range of slots ybs ([end - start, D] each) -> [T*K, D]: the slot of each flat
  assignment."""
  return take_rows(jnp.concatenate(ybs, axis=0) if len(ybs) > 1 else ybs[0], assignment_slot)


def _from_slots_fwd(ybs, assignment_slot, slot_assignment, slot_valid, ranges):
  return _from_slots(ybs, assignment_slot, slot_assignment, slot_valid, ranges), (slot_assignment, slot_valid)


def _from_slots_bwd(ranges, res, g):
  slot_assignment, slot_valid = res
  return tuple(jnp.where(slot_valid[a:b, None], take_rows(g, slot_assignment[a:b]), 0)
               for a, b in ranges), None, None, None


_from_slots.defvjp(_from_slots_fwd, _from_slots_bwd)


def cpu_default_impl(*dtypes) -> str:
  """What moe_impl='auto' runs on CPU for experts whose operands have these dtypes: 'host'
  (`kernels.host_moe`) when all are float32, on a single device (the custom call is opaque to sharding)
  and where the kernel builds, else 'blocked' (with a warning, once, when the kernel itself is what is
  missing)."""
  if not host_build.usable_for(*dtypes, what="kernels.host_moe",
                              fallback="the CPU MoE layer uses the blocked layout"):
    return "blocked"
  return "host"


def resolved_impl(impl: str, *dtypes) -> str:
  """The layout `routed_experts` runs for `impl` on one device: 'auto' is 'pallas' on GPU and
  `cpu_default_impl(*dtypes)` elsewhere; other values are themselves."""
  if impl != "auto":
    return impl
  return "pallas" if on_gpu() else cpu_default_impl(*dtypes)


def routed_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto", precision: str = "fp32",
                   capacity_factor=None):
  """The routed-experts output [T, D] for x [T, D], idx / weights [T, K], stacked expert weights.

  Under a mesh with an 'expert' axis of size > 1 the experts are split over it
  (`deepseek_jax.ops.expert_parallel`, which also runs the FP8 recipe).

  Args:
    x: [T, D] tokens in the compute dtype.
    idx, weights: [T, K] expert ids and gate weights from the router.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    impl: `ModelConfig.moe_impl` ('auto' | 'dense' | 'host' | 'blocked' | 'xla' | 'pallas'); 'auto' is
      'pallas' on GPU and 'host' or 'blocked' on CPU (`resolved_impl`).
    precision: `ModelConfig.precision`; 'fp8' runs the three GEMMs with E4M3 operands
      (`deepseek_jax.layers.fp8_experts`).
    capacity_factor: `ModelConfig.moe_capacity_factor`, for the expert-parallel dispatch (None: dropless);
      without an expert axis nothing is dropped.
  """
  from deepseek_jax.ops import expert_parallel  # pylint: disable=g-import-not-at-top
  if expert_parallel.expert_parallel_size() > 1:  # experts split over the ambient mesh's 'expert' axis
    return expert_parallel.expert_parallel_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl,
                                                   precision=precision, capacity_factor=capacity_factor)
  if precision == "fp8":
    from deepseek_jax.layers.fp8_experts import fp8_experts  # pylint: disable=g-import-not-at-top
    return fp8_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl)
  if impl == "dense":
    return dense_experts(x, idx, weights, w_gate, w_up, w_down)
  impl = resolved_impl(impl, x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
  if impl == "host":
    return host_moe.host_experts(x, idx, weights, w_gate, w_up, w_down)
  if impl == "blocked":
    return blocked_experts(x, idx, weights, w_gate, w_up, w_down)
  return sorted_experts(x, idx, weights, w_gate, w_up, w_down,
                        impl=resolve(impl, field="moe_impl"))
