"""The routed experts' three GEMMs with DeepSeek-V3's fine-grained FP8 recipe (report section 3.3).

Each expert is y = (silu(x Wg) * (x Wu)) Wd.  With `precision='fp8'` every one of its GEMMs sees the operands
an FP8 grouped GEMM multiplies:
  1. expert weights rounded to E4M3 per 128x128 block of each expert's own [in, out] matrix;
  2. activations (x for gate / up, h for down) rounded to E4M3 per 1x128 tile along the contraction - a
     per-row rounding, so it commutes with the dispatch's row gathers and may be applied before them;
  3. backward: the cotangent of each GEMM output rounded per 1x128 tile along its last axis (the dgrad
     operand of the report); weight and activation rounding pass their cotangents straight through.
The products of those E4M3 values are then taken in fp32 with fp32 accumulation (`Precision.HIGHEST`) over
the dispatch layout of `moe_impl` ('dense', 'blocked', or the expert-sorted 'xla' / 'pallas' grouped
matmuls), i.e. a quantize-dequantize simulation of the FP8 GEMM on every backend.  It differs from the
report's kernels in two ways: products are accumulated in fp32 over the whole contraction (the report
promotes every 128 elements, which is exact in the simulation), and the wgrad GEMM uses the forward's 1x128
activation tiles and the dgrad's 1x128 cotangent tiles instead of 128x1 tiles along the tokens.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels.dispatch import combine, permute, sort_by_expert
from deepseek_jax.layers import fp8
from deepseek_jax.ops import moe_dispatch
from deepseek_jax.ops.backend import on_gpu, resolve

_HI = lax.Precision.HIGHEST


def _swiglu(a, mm, w_gate, w_up, w_down, tile):
  """(silu(a Wg) * (a Wu)) Wd with E4M3 activations and cotangents; `mm(a, w)` applies expert weights."""
  gate = fp8.fake_quant_grad(mm(a, w_gate), tile)
  up = fp8.fake_quant_grad(mm(a, w_up), tile)
  h = fp8.fake_quant_act(jax.nn.silu(gate) * up, tile)
  return fp8.fake_quant_grad(mm(h, w_down), tile)


def _dense(xq, idx, weights, wg, wu, wd, tile):
  e = wg.shape[0]
  gate = fp8.fake_quant_grad(jnp.einsum("TD,EDF->TEF", xq, wg, precision=_HI), tile)
  up = fp8.fake_quant_grad(jnp.einsum("TD,EDF->TEF", xq, wu, precision=_HI), tile)
  h = fp8.fake_quant_act(jax.nn.silu(gate) * up, tile)
  y = fp8.fake_quant_grad(jnp.einsum("TEF,EFD->TED", h, wd, precision=_HI), tile)
  t = xq.shape[0]
  dense_w = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], idx].add(weights)
  return jnp.einsum("TED,TE->TD", y, dense_w, precision=_HI)


def _blocked(xq, idx, weights, wg, wu, wd, tile):
  e = wg.shape[0]
  t, k = idx.shape
  d = xq.shape[1]
  block = moe_dispatch.block_size_for(t * k, e)
  slot_token, slot_valid, block_expert, assignment_slot, _ = jax.lax.stop_gradient(
      moe_dispatch.blocked_layout(idx, e, block))
  xb = jnp.where(slot_valid[:, None], jnp.take(xq, slot_token, axis=0), 0).reshape(-1, block, d)
  onehot = jax.nn.one_hot(block_expert, e, dtype=xq.dtype)                  # [N, E]

  def mm(a, w):
    return jnp.einsum("NBI,NIO->NBO", a, jnp.einsum("NE,EIO->NIO", onehot, w, precision=_HI),
                      precision=_HI)

  yb = _swiglu(xb, mm, wg, wu, wd, tile).reshape(-1, d)
  y = jnp.take(yb, assignment_slot, axis=0).reshape(t, k, d)
  return jnp.einsum("TKD,TK->TD", y, weights.astype(y.dtype), precision=_HI)


def _sorted(xq, idx, weights, wg, wu, wd, tile, impl):
  k = idx.shape[1]
  order, group_sizes, inverse = sort_by_expert(idx, num_experts=wg.shape[0])
  xs = permute(xq, order, k)

  def mm(a, w):
    if impl == "pallas":
      from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top
      return gm.gmm(a, w, group_sizes)
    return lax.ragged_dot(a, w, group_sizes.astype(jnp.int32), precision=_HI)

  return combine(_swiglu(xs, mm, wg, wu, wd, tile), inverse, weights)


def fp8_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto", tile: int = 128,
                block: Tuple[int, int] = (128, 128)):
  """The routed experts' output [T, D] with FP8 (E4M3) expert GEMMs (see module docstring).

  Args:
    x: [T, D] tokens in the compute dtype.
    idx, weights: [T, K] expert ids and gate weights from the router.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    impl: `ModelConfig.moe_impl` ('auto' | 'dense' | 'blocked' | 'xla' | 'pallas'); 'auto' is 'pallas' on
      GPU and 'blocked' elsewhere.
    tile: activation tile along the contraction (1 x tile).
    block: weight block (per expert).

  Returns:
    [T, D] in x's dtype.
  """
  f32 = jnp.float32
  wg, wu, wd = (fp8.fake_quant_blockwise(w.astype(f32), block) for w in (w_gate, w_up, w_down))
  xq = fp8.fake_quant_act(x.astype(f32), tile)
  weights = weights.astype(f32)
  if impl == "dense":
    y = _dense(xq, idx, weights, wg, wu, wd, tile)
  elif impl == "blocked" or (impl == "auto" and not on_gpu()):
    y = _blocked(xq, idx, weights, wg, wu, wd, tile)
  else:
    y = _sorted(xq, idx, weights, wg, wu, wd, tile, resolve(impl, field="moe_impl"))
  return y.astype(x.dtype)
