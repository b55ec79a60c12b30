"""DeepSeekMoE: routed experts (dropless), shared experts, and the dispatch implementations.

y = shared_experts(x) + sum_k w_k expert_{i_k}(x), each expert a SwiGLU of width moe_intermediate_size.

Dispatch (`ModelConfig.moe_impl`, all computing the same function):
- 'dense': every expert on every token, combined with a [T, E] weight matrix (the reference).
- 'xla' (CPU default): sort the T*K (token, expert) pairs by expert, run the three projections as grouped
  matmuls (`jax.lax.ragged_dot`) over the contiguous groups, unsort and sum with the gate weights.
- 'pallas' (GPU default): the same with `kernels.grouped_matmul.gmm`.
No token is ever dropped.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import dtype_of, normal_init, param
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.router import Router
from deepseek_jax.ops.backend import resolve
from deepseek_jax.ops.grouped_matmul import grouped_matmul


def sort_by_expert(idx, num_experts: int):
  """Orders the T*K assignments by expert.

  Args:
    idx: [T, K] expert ids.
    num_experts: E.
  Returns:
    order [T*K] (flat assignment index of each sorted row; token = order // K), group_sizes [E] int32,
    inverse [T*K] (sorted position of each flat assignment).
  """
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  inverse = jnp.argsort(order)
  return order, group_sizes, inverse


def combine(y_sorted, inverse, weights):
  """sum_k weights[t, k] * y[row of (t, k)]: y_sorted [T*K, D], inverse [T*K], weights [T, K] -> [T, D]."""
  t, k = weights.shape
  y = jnp.take(y_sorted, inverse, axis=0).reshape(t, k, -1)
  return jnp.einsum("TKD,TK->TD", y, weights.astype(y.dtype))


class RoutedExperts(nn.Module):
  """E SwiGLU experts with stacked weights gate_proj/up_proj [E, D, F] and down_proj [E, F, D]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, idx, weights):
    """x [T, D], idx / weights [T, K] -> [T, D]."""
    cfg = self.cfg
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    dtype = dtype_of(cfg.dtype)
    init = normal_init(cfg.initializer_range)
    pd = dtype_of(cfg.param_dtype)
    w_gate = param(self, "gate_proj", init, (e, d, f), ("expert", "embed", "moe_mlp"), pd).astype(dtype)
    w_up = param(self, "up_proj", init, (e, d, f), ("expert", "embed", "moe_mlp"), pd).astype(dtype)
    w_down = param(self, "down_proj", init, (e, f, d), ("expert", "moe_mlp", "embed"), pd).astype(dtype)
    x = x.astype(dtype)
    impl = cfg.moe_impl if cfg.moe_impl == "dense" else resolve(cfg.moe_impl, field="moe_impl")
    if impl == "dense":
      h = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x, w_gate)) * jnp.einsum("TD,EDF->TEF", x, w_up)
      y = jnp.einsum("TEF,EFD->TED", h, w_down)
      dense_w = jnp.zeros((x.shape[0], e), jnp.float32).at[
          jnp.arange(x.shape[0])[:, None], idx].add(weights)
      return jnp.einsum("TED,TE->TD", y, dense_w.astype(dtype))
    k = idx.shape[1]
    order, group_sizes, inverse = sort_by_expert(idx, e)
    xs = jnp.take(x, order // k, axis=0)                                  # [T*K, D]
    xs = nn.with_logical_constraint(xs, ("activation_exp_tokens", "activation_embed"))
    h = (jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes, impl=impl))
         * grouped_matmul(xs, w_up, group_sizes, impl=impl))
    ys = grouped_matmul(h.astype(dtype), w_down, group_sizes, impl=impl)
    return combine(ys, inverse, weights)


class MoE(nn.Module):
  """Router + routed experts + shared experts of one DeepSeekMoE layer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    """x [B, S, D] -> (y [B, S, D], router statistics)."""
    cfg = self.cfg
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    idx, weights, stats = Router(cfg, name="gate")(flat, b)
    y = RoutedExperts(cfg, name="experts")(flat, idx, weights).reshape(b, s, d)
    if cfg.n_shared_experts:
      y = y + MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, axis="moe_mlp",
                  name="shared_experts")(x)
    return y.astype(x.dtype), stats
