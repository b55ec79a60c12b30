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
matmuls), i.e. a quantize-dequantize simulation of the FP8 GEMM on every backend.  Products are accumulated
in fp32 over the whole contraction (the report promotes every 128 elements, which the simulation does
exactly).  The blocked (CPU default) and expert-sorted (GPU default) layouts give the wgrad GEMM the report's
operands - activations and cotangents per 128 x 1 tile along each expert's tokens, tiles never crossing an
expert boundary; the 'dense' reference layout uses the forward's 1 x 128 activation tiles and the dgrad's
1 x 128 cotangent tiles there.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels.dispatch import combine, permute, sort_by_expert
from deepseek_jax.ops import fp8
from deepseek_jax.ops import moe_dispatch

_HI = lax.Precision.HIGHEST
IMPLS = ("dense", "blocked", "xla", "pallas")


def _varying_axes(x) -> frozenset:
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def _vary_like(w, x):
  """w marked varying over the manual mesh axes x varies over (inside `jax.shard_map`; a no-op outside).

  A custom VJP must return each cotangent with its primal's type; the weight gradient of a product with
  per-device tokens varies over the token axes, so the weights go in with that type already.  Autodiff then
  transposes the cast into the psum over those axes that the weight gradient needs.
  """
  extra = tuple(sorted(_varying_axes(x) - _varying_axes(w)))
  return jax.lax.pcast(w, extra, to="varying") if extra else w


def _dense(xq, idx, weights, wg, wu, wd, tile):
  e = wg.shape[0]
  gate = fp8.fake_quant_grad(jnp.einsum("TD,EDF->TEF", xq, wg, precision=_HI), tile)
  up = fp8.fake_quant_grad(jnp.einsum("TD,EDF->TEF", xq, wu, precision=_HI), tile)
  h = fp8.fake_quant_act(jax.nn.silu(gate) * up, tile)
  y = fp8.fake_quant_grad(jnp.einsum("TEF,EFD->TED", h, wd, precision=_HI), tile)
  t = xq.shape[0]
  dense_w = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], idx].add(weights)
  return jnp.einsum("TED,TE->TD", y, dense_w, precision=_HI)


def _gemm_ffn(a, mm, w_gate, w_up, w_down, tile):
  """(silu(a Wg) * (a Wu)) Wd where `mm` quantizes its own backward operands (dgrad and wgrad)."""
  h = fp8.fake_quant_act(jax.nn.silu(mm(a, w_gate)) * mm(a, w_up), tile)
  return mm(h, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _block_gemm(a, w, tile):
  """a [N,B,I] @ w [N,I,O] per block, both already E4M3-rounded (forward); the backward follows the report:
  dgrad = (dy per 1 x tile along O) @ w^T, wgrad = (a per tile x 1 along the rows)^T @ (dy per tile x 1)."""
  return jnp.einsum("NBI,NIO->NBO", a, w, precision=_HI)


def _block_gemm_fwd(a, w, tile):
  return _block_gemm(a, w, tile), (a, w)


def _block_gemm_bwd(tile, res, g):
  a, w = res
  da = jnp.einsum("NBO,NIO->NBI", fp8.fake_quant_act(g, tile), w, precision=_HI)
  rows = lambda v: jnp.swapaxes(fp8.fake_quant_act(jnp.swapaxes(v, 1, 2), tile), 1, 2)
  dw = jnp.einsum("NBI,NBO->NIO", rows(a), rows(g), precision=_HI)
  return da, dw


_block_gemm.defvjp(_block_gemm_fwd, _block_gemm_bwd)


def _blocked(xq, idx, weights, wg, wu, wd, tile):
  """The blocked dispatch of `moe_dispatch` with FP8 GEMMs in the report's three operand layouts (every
  block holds rows of one expert, so 128 x 1 tiles along its rows are tiles along that expert's tokens)."""

  def ffn(xb, per_block, w_gate, w_up, w_down):
    return _gemm_ffn(xb, lambda a, w: _block_gemm(a, per_block(w), tile), w_gate, w_up, w_down, tile)

  return moe_dispatch.blocked_experts(xq, idx, weights, wg, wu, wd, block_ffn=ffn)


def _token_tile_ids(group_sizes, rows: int, tile: int):
  """Tile id of each expert-sorted row: tiles of `tile` consecutive rows that never cross an expert's
  boundary (a 128 x 1 tile along one expert's tokens); returns (ids [rows], static number of tiles)."""
  start = jnp.cumsum(group_sizes) - group_sizes
  tiles = (group_sizes + tile - 1) // tile
  first_tile = jnp.cumsum(tiles) - tiles
  r = jnp.arange(rows, dtype=jnp.int32)
  g = jnp.clip(jnp.searchsorted(jnp.cumsum(group_sizes), r, side="right"), 0, group_sizes.shape[0] - 1)
  return first_tile[g] + (r - start[g]) // tile, -(-rows // tile) + group_sizes.shape[0]


def _qdq_token_tiles(a, tile_ids, num_tiles: int):
  """a [M, C] rounded to E4M3 per (row tile, column): the scale is the tile's max-abs / 448."""
  amax = jax.ops.segment_max(jnp.abs(a), tile_ids, num_segments=num_tiles)       # [num_tiles, C]
  scale = jnp.where(amax > 0, amax * jnp.float32(1 / fp8.E4M3_MAX), 1.0)[tile_ids]
  q = jnp.clip(a / scale, -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(fp8.E4M3)
  return q.astype(a.dtype) * scale


def _sorted(xq, idx, weights, wg, wu, wd, tile, impl, interpret):
  """Expert-sorted rows through grouped matmuls (ragged_dot or gmm) whose backward follows the report:
  dgrad with the cotangent per 1 x tile, wgrad with both operands per tile x 1 along each expert's tokens."""
  k = idx.shape[1]
  order, group_sizes, inverse = sort_by_expert(idx, num_experts=wg.shape[0])
  xs = permute(xq, order, k)
  tile_ids, num_tiles = _token_tile_ids(group_sizes, xs.shape[0], tile)

  def gmm(a, w, sizes):
    if impl == "pallas":
      from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top
      return gm.gmm(a, w, sizes, interpret=interpret)
    return lax.ragged_dot(a, w, sizes.astype(jnp.int32), precision=_HI)

  # The group sizes and tile ids are explicit (integer, non-differentiable) arguments: a custom VJP may
  # not close over traced values, which under shard_map (expert parallelism) would leak.
  @jax.custom_vjp
  def mm_op(a, w, sizes, ids):
    del ids
    return gmm(a, w, sizes)

  def mm_fwd(a, w, sizes, ids):
    return gmm(a, w, sizes), (a, w, sizes, ids)

  def mm_bwd(res, g):
    a, w, sizes, ids = res
    da = gmm(fp8.fake_quant_act(g, tile), jnp.swapaxes(w, 1, 2), sizes)
    _, w_vjp = jax.vjp(lambda w_: gmm(_qdq_token_tiles(a, ids, num_tiles), w_, sizes), w)
    return da, w_vjp(_qdq_token_tiles(g, ids, num_tiles))[0], None, None

  mm_op.defvjp(mm_fwd, mm_bwd)
  mm = lambda a, w: mm_op(a, w, group_sizes, tile_ids)
  return combine(_gemm_ffn(xs, mm, wg, wu, wd, tile), inverse, weights)


def fp8_experts(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "blocked", interpret: bool | None = None,
                tile: int = 128, block: Tuple[int, int] = (128, 128)):
  """The routed experts' output [T, D] with FP8 (E4M3) expert GEMMs (see module docstring).

  Args:
    x, idx, weights, w_gate, w_up, w_down: as `deepseek_jax.layers.moe.routed_experts`.
    impl: the dispatch layout, 'dense' | 'blocked' | 'xla' (ragged_dot) | 'pallas' (gmm).
    interpret: the Pallas kernel's interpret mode (impl 'pallas').
    tile: activation tile along the contraction (1 x tile).
    block: weight block (per expert).

  Returns:
    [T, D] in x's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"FP8 experts impl={impl!r}: expected one of {IMPLS}")
  f32 = jnp.float32
  wg, wu, wd = (_vary_like(fp8.fake_quant_blockwise(w.astype(f32), block), x)  # (inside expert parallelism)
                for w in (w_gate, w_up, w_down))
  xq = fp8.fake_quant_act(x.astype(f32), tile)
  weights = weights.astype(f32)
  if impl == "dense":
    y = _dense(xq, idx, weights, wg, wu, wd, tile)
  elif impl == "blocked":
    y = _blocked(xq, idx, weights, wg, wu, wd, tile)
  else:
    y = _sorted(xq, idx, weights, wg, wu, wd, tile, impl, interpret)
  return y.astype(x.dtype)


def fp8_grouped_swiglu(xs, group_sizes, w_gate, w_up, w_down, *, impl: str = "xla",
                       interpret: bool | None = None):
  """The FP8 recipe on rows already sorted by expert (group_sizes rows of each, then rows whose output is 0):
  one assignment of weight 1 per row, the rows past the groups given the out-of-range expert id E, which the
  recipe's sort leaves out of every group.  `impl`: 'xla' | 'pallas'.  -> [M, D] in xs's dtype."""
  rows = jnp.arange(xs.shape[0], dtype=jnp.int32)
  expert = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right").astype(jnp.int32)
  weight = (expert < w_gate.shape[0]).astype(jnp.float32)
  return fp8_experts(xs, expert[:, None], weight[:, None], w_gate, w_up, w_down, impl=impl,
                     interpret=interpret)
