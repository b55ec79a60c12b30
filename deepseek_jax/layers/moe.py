"""DeepSeekMoE: routed experts (dropless), shared experts, and the dispatch implementations.

y = shared_experts(x) + sum_k w_k expert_{i_k}(x), each expert a SwiGLU of width moe_intermediate_size.

Dispatch (`ModelConfig.moe_impl`) lives in `deepseek_jax.ops.moe_dispatch`; no token is ever dropped.
"""

from __future__ import annotations

import flax.linen as nn

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import fp8_weights
from deepseek_jax.layers.linear import dtype_of, normal_init, param
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.router import Router
from deepseek_jax.ops.moe_dispatch import routed_experts


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
    if cfg.fp8_weights:  # E4M3 codes + per-block scales, dequantized here
      w_gate, w_up, w_down = fp8_weights.expert_kernels(self, cfg)
    else:
      w_gate = param(self, "gate_proj", init, (e, d, f), ("expert", "embed", "moe_mlp"), pd).astype(dtype)
      w_up = param(self, "up_proj", init, (e, d, f), ("expert", "embed", "moe_mlp"), pd).astype(dtype)
      w_down = param(self, "down_proj", init, (e, f, d), ("expert", "moe_mlp", "embed"), pd).astype(dtype)
    return routed_experts(x.astype(dtype), idx, weights, w_gate, w_up, w_down, impl=cfg.moe_impl,
                          precision=cfg.precision, capacity_factor=cfg.moe_capacity_factor)


class MoE(nn.Module):
  """Router + routed experts + shared experts of one DeepSeekMoE layer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    """x [B, S, D] -> (y [B, S, D], router statistics)."""
    cfg = self.cfg
    b, s, d = x.shape
    # Tokens stay split as the batch is: left to itself, XLA's partitioner may route every token of the
    # global batch on every device (the gate's D is split over 'fsdp').
    flat = nn.with_logical_constraint(x.reshape(b * s, d), ("activation_batch", "activation_embed"))
    idx, weights, stats = Router(cfg, name="gate")(flat, b)
    y = RoutedExperts(cfg, name="experts")(flat, idx, weights).reshape(b, s, d)
    if cfg.n_shared_experts:
      y = y + MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, axis="moe_mlp",
                  name="shared_experts")(x)
    return y.astype(x.dtype), stats
