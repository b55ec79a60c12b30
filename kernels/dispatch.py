"""Token <-> expert-sorted row layout for dropless MoE with `kernels.grouped_matmul.gmm`.

1. `sort_by_expert` flattens the [T, K] expert choices and sorts them stably by expert id, giving the
   row order, the rows per expert (the gmm `group_sizes`) and the inverse permutation;
2. `permute` gathers token rows into that order ([T*K, D], each token once per chosen expert);
3. after the expert matmuls, `combine` scatters rows back and sums each token's K outputs with its
   routing weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(expert_ids, *, num_experts: int):
  """Sorts the flattened (token, slot) assignments by expert.

  Args:
    expert_ids: [T, K] int expert chosen by each token in each of its K slots.
    num_experts: number of groups G (experts on this device).

  Returns:
    order: [T*K] int32 flat assignment index (token * K + slot) of each sorted row.
    group_sizes: [G] int32 rows per expert (ids outside [0, G) are not counted and sort last).
    inverse: [T*K] int32 sorted row of each flat assignment (order[inverse] == arange).
  """
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  return order, group_sizes, inverse


def take_rows(x, rows):
  """x[rows] along axis 0 for indices known to be in range: a plain gather, without the bounds select
  that `jnp.take` adds (which XLA:CPU runs as a separate pass over the result)."""
  return x.at[rows].get(mode="promise_in_bounds")


def permute(x, order, k: int):
  """Gathers token rows into expert-sorted order.

  Args:
    x: [T, D] token activations.
    order: [T*K] from `sort_by_expert`.
    k: experts per token K.

  Returns:
    [T*K, D] rows sorted by expert.
  """
  # The flat index is token * K + slot.
  return take_rows(x, order // k)


def combine(y_sorted, inverse, weights):
  """Un-sorts expert outputs and takes each token's weighted sum over its K slots.

  Args:
    y_sorted: [T*K, D] expert outputs in sorted order.
    inverse: [T*K] from `sort_by_expert`.
    weights: [T, K] routing weights.

  Returns:
    [T, D] in y_sorted's dtype, summed in fp32.
  """
  t, k = weights.shape
  y = take_rows(y_sorted, inverse).reshape(t, k, -1)
  return jnp.einsum("TKD,TK->TD", y.astype(jnp.float32),
                    weights.astype(jnp.float32)).astype(y_sorted.dtype)
