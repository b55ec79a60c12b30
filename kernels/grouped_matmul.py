"""Grouped (ragged) matmul for dropless MoE experts: `gmm` and its transpose `tgmm`.

`gmm(x, w, group_sizes)` equals `jax.lax.ragged_dot(x, w, group_sizes)`: the rows of x are sorted
by group, rows offsets[g]:offsets[g+1] are multiplied by w[g], rows past sum(group_sizes) give 0.

Algorithm (gmm):
  1. the wrapper computes group offsets and, per M tile, the first and last group that the tile's
     rows touch (a tile may straddle several group boundaries; tiles past the last row touch none);
  2. the grid runs over (M tile, N tile), M fastest so that concurrent programs read the same slab
     of w[g] through L2; a program loops over its groups (empty groups skip their K loop) and, for
     each, over K, accumulating `where(row in group, x, 0) @ w[g]` in fp32;
  3. the tile is written once, so no atomics are needed.
`tgmm(x, dy, group_sizes)` gives dw[g] = x[rows of g]^T @ dy[rows of g]: the grid runs over
(K tile, N tile, group); a program loops over the M tiles of its group with rows masked. Empty groups
loop zero times and write zeros. The backward of gmm is dx = gmm(dy, w^T) (w read transposed in the
kernel, never copied) and dw = tgmm(x, dy).

Lowering: Pallas' Triton backend (`plgpu.CompilerParams`), as in `kernels.mla_attention`: the same
API across jax 0.10 / 0.11 and every CUDA GPU from Ampere on, where Mosaic GPU's ragged-dot kernels
are Hopper/Blackwell-specific. Interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import _common

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) of gmm and tgmm.

  Attributes:
    block_m, block_k, block_n: gmm tile of x rows, contraction step, output columns.
    block_m_t, block_k_t, block_n_t: tgmm contraction step over rows, dw tile rows / columns.
    num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  """
  block_m: int = 128
  block_k: int = 64
  block_n: int = 128
  block_m_t: int = 64
  block_k_t: int = 128
  block_n_t: int = 128
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for f in ("block_m", "block_k", "block_n", "block_m_t", "block_k_t", "block_n_t"):
      _common.check_pow2(f"BlockSizes.{f}", getattr(self, f))

  @classmethod
  def get_default(cls, backend: str | None = None) -> "BlockSizes":
    """Defaults per backend: H100/H200-sized tiles on GPU, small tiles for interpret mode."""
    backend = backend or _common.backend()
    if backend == "gpu":
      return cls()
    return cls(block_m=32, block_k=32, block_n=32, block_m_t=32, block_k_t=32, block_n_t=32,
               num_warps=4, num_stages=1)


def gmm_kernel(offsets_ref, lo_ref, hi_ref, x_ref, w_ref, o_ref, *, block_m, block_k,
               transpose_rhs):
  """One (M tile, N tile): sum over the tile's groups of masked x @ w[g]."""
  t = pl.program_id(0)
  num_k = x_ref.shape[1] // block_k
  rows = t * block_m + lax.broadcasted_iota(jnp.int32, (block_m,), 0)

  def group_body(g, acc):
    start, end = offsets_ref[g], offsets_ref[g + 1]
    in_group = ((rows >= start) & (rows < end))[:, None]

    def k_body(kk, acc):
      ks = pl.ds(kk * block_k, block_k)
      xb = jnp.where(in_group, x_ref[:, ks], 0).astype(x_ref.dtype)
      if transpose_rhs:      # w_ref block [G, block_n, K]: out = x @ w[g]^T
        wb = w_ref[g, :, ks]
        return acc + lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
      wb = w_ref[g, ks, :]   # w_ref block [G, K, block_n]
      return acc + jnp.dot(xb, wb, preferred_element_type=_F32)

    return lax.fori_loop(0, jnp.where(end > start, num_k, 0), k_body, acc)

  acc = jnp.zeros(o_ref.shape, _F32)
  acc = lax.fori_loop(lo_ref[t], hi_ref[t] + 1, group_body, acc)
  o_ref[...] = acc.astype(o_ref.dtype)


def tgmm_kernel(offsets_ref, x_ref, dy_ref, o_ref, *, block_m):
  """One (K tile, N tile, group): x[rows of g]^T @ dy[rows of g]."""
  g = pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  first = start // block_m
  count = jnp.where(end > start, lax.div(end + block_m - 1, block_m) - first, 0)

  def body(i, acc):
    tile = first + i
    rs = pl.ds(tile * block_m, block_m)
    rows = tile * block_m + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    in_group = ((rows >= start) & (rows < end))[:, None]
    xb = jnp.where(in_group, x_ref[rs, :], 0).astype(x_ref.dtype)
    return acc + lax.dot_general(xb, dy_ref[rs, :], (((0,), (0,)), ((), ())),
                                 preferred_element_type=_F32)

  acc = lax.fori_loop(0, count, body, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _offsets(group_sizes):
  gs = jnp.asarray(group_sizes, jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(gs, dtype=jnp.int32)])


def _pad2(x, rows, cols):
  pr, pc = rows - x.shape[0], cols - x.shape[1]
  return jnp.pad(x, ((0, pr), (0, pc))) if (pr or pc) else x


def _gmm_call(x, w, group_sizes, bs: BlockSizes, interpret: bool, transpose_rhs: bool):
  """out[M, N] = x @ w[g] (w [G,K,N]) or x @ w[g]^T (transpose_rhs, w [G,N,K])."""
  m, k = x.shape
  g = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  bm = _common.fit_block(bs.block_m, m)
  bk = _common.fit_block(bs.block_k, k)
  bn = _common.fit_block(bs.block_n, n)
  mp, kp, np_ = _common.round_up(m, bm), _common.round_up(k, bk), _common.round_up(n, bn)
  xp = _pad2(x, mp, kp)
  if transpose_rhs:
    wp = jnp.pad(w, ((0, 0), (0, np_ - n), (0, kp - k))) if (np_ != n or kp != k) else w
    w_spec = pl.BlockSpec((g, bn, kp), lambda t, j: (0, j, 0))
  else:
    wp = jnp.pad(w, ((0, 0), (0, kp - k), (0, np_ - n))) if (np_ != n or kp != k) else w
    w_spec = pl.BlockSpec((g, kp, bn), lambda t, j: (0, 0, j))

  offsets = _offsets(group_sizes)
  total = offsets[-1]
  num_tiles = mp // bm
  first = jnp.arange(num_tiles, dtype=jnp.int32) * bm
  last = jnp.minimum(first + bm, total) - 1
  # The group holding row r is the first g with offsets[g+1] > r (empty groups are skipped over).
  lo = jnp.searchsorted(offsets[1:], first, side="right").astype(jnp.int32)
  hi = jnp.searchsorted(offsets[1:], last, side="right").astype(jnp.int32)
  hi = jnp.where(first < total, hi, lo - 1)       # tiles past the last row visit no group
  full = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * a.ndim)

  out = pl.pallas_call(
      functools.partial(gmm_kernel, block_m=bm, block_k=bk, transpose_rhs=transpose_rhs),
      grid=(num_tiles, np_ // bn),
      in_specs=[full(offsets), full(lo), full(hi),
                pl.BlockSpec((bm, kp), lambda t, j: (t, 0)), w_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda t, j: (t, j)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="gmm",
  )(offsets, lo, hi, xp, wp)
  return out[:m, :n]


def _tgmm_call(x, dy, group_sizes, bs: BlockSizes, interpret: bool):
  m, k = x.shape
  n = dy.shape[1]
  g = group_sizes.shape[0]
  bm = _common.fit_block(bs.block_m_t, m)
  bk = _common.fit_block(bs.block_k_t, k)
  bn = _common.fit_block(bs.block_n_t, n)
  mp, kp, np_ = _common.round_up(m, bm), _common.round_up(k, bk), _common.round_up(n, bn)
  offsets = _offsets(group_sizes)
  out = pl.pallas_call(
      functools.partial(tgmm_kernel, block_m=bm),
      grid=(kp // bk, np_ // bn, g),
      in_specs=[pl.BlockSpec(offsets.shape, lambda a, b, c: (0,)),
                pl.BlockSpec((mp, bk), lambda a, b, c: (0, a)),
                pl.BlockSpec((mp, bn), lambda a, b, c: (0, b))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda a, b, c: (c, a, b)),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="tgmm",
  )(offsets, _pad2(x, mp, kp), _pad2(dy, mp, np_))
  return out[:, :k, :n]


def _check(x, w, group_sizes):
  if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f"x must be [M,K], w [G,K,N], group_sizes [G]; got {x.shape}, {w.shape}, "
                     f"{group_sizes.shape}")
  if x.shape[1] != w.shape[1] or w.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape} disagree on K or G")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, bs, interpret):
  return _gmm_call(x, w, group_sizes, bs, interpret, transpose_rhs=False)


def _gmm_fwd(x, w, group_sizes, bs, interpret):
  return _gmm(x, w, group_sizes, bs, interpret), (x, w, group_sizes)


def _gmm_bwd(bs, interpret, res, dy):
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = _gmm_call(dy, w, group_sizes, bs, interpret, transpose_rhs=True)
  dw = _tgmm_call(x, dy, group_sizes, bs, interpret).astype(w.dtype)
  return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gmm(x, w, group_sizes, *, block_sizes: BlockSizes | None = None,
        interpret: bool | None = None):
  """Grouped matmul, same meaning as `jax.lax.ragged_dot(x, w, group_sizes)`; differentiable.

  Args:
    x: [M, K] rows sorted by group.
    w: [G, K, N] one matrix per group (same dtype as x).
    group_sizes: [G] int32 rows per group; sum <= M, rows past the sum give 0.
    block_sizes: tile sizes; default `BlockSizes.get_default()`.
    interpret: run Pallas in interpret mode; None means interpret on CPU only.

  Returns:
    [M, N] in x's dtype, accumulated in fp32.
  """
  _check(x, w, group_sizes)
  if x.dtype != w.dtype:
    raise ValueError(f"x dtype {x.dtype} != w dtype {w.dtype}")
  bs = block_sizes or BlockSizes.get_default()
  return _gmm(x, w, group_sizes.astype(jnp.int32), bs, _common.resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def tgmm(x, dy, group_sizes, *, block_sizes: BlockSizes | None = None,
         interpret: bool | None = None):
  """Transposed grouped matmul: dw[g] = x[rows of g]^T @ dy[rows of g].

  Args:
    x: [M, K] rows sorted by group.
    dy: [M, N] same row order.
    group_sizes: [G] int32 rows per group.
    block_sizes: tile sizes; default `BlockSizes.get_default()`.
    interpret: run Pallas in interpret mode; None means interpret on CPU only.

  Returns:
    [G, K, N] in x's dtype; empty groups are zero.
  """
  if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
    raise ValueError(f"x [M,K] and dy [M,N] must share M; got {x.shape}, {dy.shape}")
  bs = block_sizes or BlockSizes.get_default()
  return _tgmm_call(x, dy.astype(x.dtype), group_sizes.astype(jnp.int32), bs,
                    _common.resolve_interpret(interpret))


@jax.jit
def gmm_reference(x, w, group_sizes):
  """Plain jnp grouped matmul: one masked dense matmul per group (independent of ragged_dot).

  Args:
    x: [M, K]; w: [G, K, N]; group_sizes: [G] int.

  Returns:
    [M, N] in x's dtype (fp32 accumulation); rows past sum(group_sizes) are 0.
  """
  offsets = _offsets(group_sizes)
  rows = jnp.arange(x.shape[0])
  out = jnp.zeros((x.shape[0], w.shape[2]), _F32)
  for g in range(w.shape[0]):
    keep = ((rows >= offsets[g]) & (rows < offsets[g + 1]))[:, None]
    out = out + jnp.where(keep, jnp.dot(x, w[g], preferred_element_type=_F32), 0.0)
  return out.astype(x.dtype)
