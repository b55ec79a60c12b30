"""Routed-expert computation of a DeepSeekMoE layer: the dispatch implementations.

All compute y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]) with expert(x) = (silu(x Wg) * (x Wu)) Wd, dropless:
- 'dense': every expert on every token, combined through a [T, E] weight matrix (the reference).
- 'xla': sort the T*K (token, expert) assignments by expert, grouped matmuls with `jax.lax.ragged_dot`
  over the contiguous groups, unsort, weighted sum over K.
- 'pallas': the same with the Pallas `kernels.grouped_matmul.gmm`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels.dispatch import combine, permute, sort_by_expert
from deepseek_jax.ops.backend import resolve
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


def routed_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto"):
  """The routed-experts output [T, D] for x [T, D], idx / weights [T, K], stacked expert weights.

  Args:
    x: [T, D] tokens in the compute dtype.
    idx, weights: [T, K] expert ids and gate weights from the router.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    impl: `ModelConfig.moe_impl` ('auto' | 'dense' | 'xla' | 'pallas').
  """
  from deepseek_jax.ops import expert_parallel  # pylint: disable=g-import-not-at-top
  if expert_parallel.expert_parallel_size() > 1:  # experts split over the ambient mesh's 'expert' axis
    return expert_parallel.expert_parallel_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl)
  if impl == "dense":
    return dense_experts(x, idx, weights, w_gate, w_up, w_down)
  return sorted_experts(x, idx, weights, w_gate, w_up, w_down,
                        impl=resolve(impl, field="moe_impl"))
