"""DeepSeekMoE: routed experts (dropless), shared experts.

y = shared_experts(x) + sum_k w_k expert_{i_k}(x), each expert a SwiGLU of width moe_intermediate_size.

`routed_experts` picks the computation for a concrete `ModelConfig.moe_impl` and precision: the dispatch
layouts of `deepseek_jax.ops.moe_dispatch`, the FP8 recipe of `deepseek_jax.ops.fp8_experts`, the opt-in
host kernel, and, under a mesh with an 'expert' axis (or for the grouped-matmul kernels on several devices),
`deepseek_jax.ops.expert_parallel`; no token is dropped unless a capacity is set.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import fp8_weights
from deepseek_jax.layers.linear import dtype_of, normal_init, param
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.router import Router
from deepseek_jax.ops import expert_parallel, fp8_experts, moe_dispatch, per_shard

IMPLS = ("dense", "blocked", "xla", "pallas", "tokamax", "host")


def routed_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "xla", precision: str = "fp32",
                   interpret: bool | None = None, capacity_factor: float | None = None):
  """The routed-experts output [T, D] for x [T, D], idx / weights [T, K], stacked expert weights.

  Args:
    x: [T, D] tokens in the compute dtype.
    idx, weights: [T, K] expert ids and gate weights from the router.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    impl: a concrete `ModelConfig.moe_impl` ('dense' | 'blocked' | 'xla' | 'pallas' | 'tokamax' | 'host';
      `deepseek_jax.ops.impls` resolves 'auto'); under a mesh with an 'expert' axis of size > 1 the experts
      are split over it and impl ('xla' | 'pallas') is the grouped matmul of each device's rows.
    precision: `ModelConfig.precision`; 'fp8' runs the three GEMMs with E4M3 operands.
    interpret: the Pallas kernels' interpret mode (`ModelConfig.pallas_interpret`).
    capacity_factor: `ModelConfig.moe_capacity_factor`, for the expert-parallel dispatch (None: dropless);
      without an expert axis nothing is dropped.
  """
  if impl not in IMPLS:
    raise ValueError(f"moe impl={impl!r}: expected one of {IMPLS} (deepseek_jax.ops.impls resolves 'auto')")
  fp8 = precision == "fp8"
  if fp8 and impl == "host":
    raise ValueError("moe impl='host' runs float32 GEMMs; precision='fp8' needs another impl")
  mesh = per_shard.ambient_mesh()
  # The grouped-matmul kernels are custom calls XLA's partitioner cannot split: on several devices they run
  # per device on its own tokens, as with the experts split over an 'expert' axis.
  if expert_parallel.expert_parallel_size(mesh) > 1 or (impl in ("pallas", "tokamax")
                                                        and per_shard.mesh_devices(mesh) > 1):
    if impl not in ("xla", "pallas", "tokamax"):
      raise ValueError(f"moe impl={impl!r} runs one device's experts; split over the 'expert' mesh axis "
                       "they need 'xla', 'pallas' or 'tokamax'")
    ffn = fp8_experts.fp8_grouped_swiglu if fp8 else moe_dispatch.grouped_swiglu
    return expert_parallel.expert_parallel_experts(
        x, idx, weights, w_gate, w_up, w_down, check_vma=impl != "pallas", capacity_factor=capacity_factor,
        expert_ffn=functools.partial(ffn, impl=impl, interpret=interpret))
  if fp8:
    return fp8_experts.fp8_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl, interpret=interpret)
  if impl == "dense":
    return moe_dispatch.dense_experts(x, idx, weights, w_gate, w_up, w_down)
  if impl == "blocked":
    return moe_dispatch.blocked_experts(x, idx, weights, w_gate, w_up, w_down)
  if impl == "host":
    from kernels import host_moe  # pylint: disable=g-import-not-at-top
    return host_moe.host_experts(x, idx, weights, w_gate, w_up, w_down)
  return moe_dispatch.sorted_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl, interpret=interpret)


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
                          precision=cfg.precision, interpret=cfg.pallas_interpret,
                          capacity_factor=cfg.moe_capacity_factor)


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
