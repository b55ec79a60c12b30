"""Grouped (ragged) matmul for dropless MoE experts: `gmm` and its transpose `tgmm`.

`gmm(x, w, group_sizes)` equals `jax.lax.ragged_dot(x, w, group_sizes)`: the rows of x are sorted
by group, rows offsets[g]:offsets[g+1] are multiplied by w[g], rows past sum(group_sizes) give 0.

Algorithm (gmm): each group's rows are cut into tiles that start at the group's first row, so a tile
holds one group only and each (tile, group) pair is visited once:
  1. the wrapper lists the tiles (`_gmm_tiles`): per group, full `block_m`-row tiles, then the rest
     in a `block_m` tile, or in a `block_m_small` tile when it fits one; then tiles that zero the
     rows past the last group; slots beyond those are idle;
  2. the grid runs over (tile slot, N tile); a program loads its rows with a masked load (rows
     outside its range read as 0; near the end of x the load window is shifted back so that it
     stays inside the array), runs the K loop once and stores its rows with a masked store;
  3. every output row is written by exactly one program, so no atomics are needed.
The issued MMA work over the useful FLOPs is `gmm_work_ratio` (rounding each group up to the tile
sizes), about 1.06 at DeepSeek-V3's routed-expert shapes (docs/gpu.md).
`tgmm(x, dy, group_sizes)` gives dw[g] = x[rows of g]^T @ dy[rows of g]: the grid runs over
(K tile, N tile, group); a program loops over its group's rows in `block_m_t` chunks starting at the
group's first row, loaded masked. Empty groups write zeros. The backward of gmm is
dx = gmm(dy, w^T) (w read transposed in the kernel, never copied) and dw = tgmm(x, dy).

Float32 inputs multiply in full float32 (`_common.dot_precision`), never TF32.

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
    block_m, block_m_small: gmm tile rows; a group's last tile uses block_m_small rows when its
      remaining rows fit (0, or not below block_m: never).
    block_k, block_n: gmm contraction step and output columns.
    block_m_t, block_k_t, block_n_t: tgmm contraction step over rows, dw tile rows / columns.
    num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  """
  block_m: int = 64
  block_m_small: int = 32
  block_k: int = 64
  block_n: int = 128
  block_m_t: int = 32
  block_k_t: int = 128
  block_n_t: int = 128
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for f in ("block_m", "block_k", "block_n", "block_m_t", "block_k_t", "block_n_t"):
      _common.check_pow2(f"BlockSizes.{f}", getattr(self, f))
    if self.block_m_small:
      _common.check_pow2("BlockSizes.block_m_small", self.block_m_small)

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=None) -> "BlockSizes":
    """Defaults per backend (H100/H200-sized tiles on GPU, small tiles for interpret mode) and dtype
    (float32 tiles hold twice the bytes: narrower K steps)."""
    backend = backend or _common.backend()
    if backend == "gpu":
      if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        return cls(block_k=16, block_k_t=64, block_n_t=64, num_stages=2)
      return cls()
    return cls(block_m=32, block_m_small=16, block_k=32, block_n=32, block_m_t=16, block_k_t=32,
               block_n_t=32, num_warps=4, num_stages=1)


def gmm_kernel(tiles_ref, x_ref, w_ref, o_ref, *, block_m, block_m_small, block_k, block_n,
               transpose_rhs, precision):
  """One (tile slot, N tile): rows [lo, hi) of group g times w[g] (g == G: zeros; g < 0: idle)."""
  t, j = pl.program_id(0), pl.program_id(1)
  g, lo, hi = tiles_ref[0, t], tiles_ref[1, t], tiles_ref[2, t]
  m = x_ref.shape[0]
  num_groups = w_ref.shape[0]
  num_k = x_ref.shape[1] // block_k
  cols = pl.ds(j * block_n, block_n)

  def product(rows_static):
    # The load window starts at lo unless that would run past the end of x; rows outside
    # [lo, hi) are masked on load and on store.
    start = jnp.minimum(lo, m - rows_static)
    rows = start + lax.broadcasted_iota(jnp.int32, (rows_static,), 0)
    keep = ((rows >= lo) & (rows < hi))[:, None]

    def k_body(kk, acc):
      ks = pl.ds(kk * block_k, block_k)
      xb = plgpu.load(x_ref.at[pl.ds(start, rows_static), ks], mask=keep, other=0)
      if transpose_rhs:      # w_ref [G, N, K]: out = x @ w[g]^T
        return acc + lax.dot_general(xb, w_ref[g, cols, ks], (((1,), (1,)), ((), ())),
                                     precision=precision, preferred_element_type=_F32)
      return acc + jnp.dot(xb, w_ref[g, ks, cols], precision=precision,
                           preferred_element_type=_F32)

    acc = jnp.zeros((rows_static, block_n), _F32)
    acc = lax.cond(g < num_groups, lambda a: lax.fori_loop(0, num_k, k_body, a), lambda a: a, acc)
    plgpu.store(o_ref.at[pl.ds(start, rows_static), cols], acc.astype(o_ref.dtype), mask=keep)

  @pl.when(g >= 0)
  def _():
    if block_m_small:
      lax.cond(hi - lo <= block_m_small, lambda: product(block_m_small), lambda: product(block_m))
    else:
      product(block_m)


def tgmm_kernel(offsets_ref, x_ref, dy_ref, o_ref, *, block_m, precision):
  """One (K tile, N tile, group): x[rows of g]^T @ dy[rows of g], rows in chunks from the first."""
  g = pl.program_id(2)
  m = x_ref.shape[0]
  start, end = offsets_ref[g], offsets_ref[g + 1]
  count = lax.div(jnp.maximum(end - start, 0) + block_m - 1, block_m)

  def body(i, acc):
    lo = start + i * block_m
    base = jnp.minimum(lo, m - block_m)
    rows = base + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    keep = ((rows >= lo) & (rows < end))[:, None]
    rs = pl.ds(base, block_m)
    xb = plgpu.load(x_ref.at[rs, :], mask=keep, other=0)
    dyb = plgpu.load(dy_ref.at[rs, :], mask=keep, other=0)
    return acc + lax.dot_general(xb, dyb, (((0,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=_F32)

  acc = lax.fori_loop(0, count, body, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _offsets(group_sizes):
  gs = jnp.asarray(group_sizes, jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(gs, dtype=jnp.int32)])


def _pad2(x, rows, cols):
  pr, pc = rows - x.shape[0], cols - x.shape[1]
  return jnp.pad(x, ((0, pr), (0, pc))) if (pr or pc) else x


def _num_tile_slots(m: int, g: int, block_m: int) -> int:
  """Enough slots for every group's tiles (at most one partial tile per group) and the zero tail."""
  return _common.cdiv(m, block_m) + g + 1


def _gmm_tiles(group_sizes, m: int, block_m: int):
  """[3, slots] int32 (group, first row, end row) per tile slot; group G zeroes rows past the last
  group, group -1 is an idle slot."""
  gs = jnp.maximum(jnp.asarray(group_sizes, jnp.int32), 0)
  g = gs.shape[0]
  offsets = _offsets(gs)
  total = offsets[-1]
  tail = jnp.maximum(m - total, 0)
  counts = jnp.concatenate([lax.div(gs + block_m - 1, block_m),
                            lax.div(tail + block_m - 1, block_m)[None]])         # [G + 1]
  ends = jnp.cumsum(counts)
  slot = jnp.arange(_num_tile_slots(m, g, block_m), dtype=jnp.int32)
  grp = jnp.searchsorted(ends, slot, side="right").astype(jnp.int32)              # G + 1: idle
  grp_c = jnp.minimum(grp, g)
  local = slot - (ends[grp_c] - counts[grp_c])
  starts = jnp.concatenate([offsets[:-1], total[None]])
  group_end = jnp.concatenate([offsets[1:], jnp.full((1,), m, jnp.int32)])
  lo = starts[grp_c] + local * block_m
  hi = jnp.minimum(lo + block_m, group_end[grp_c])
  grp = jnp.where(grp > g, -1, grp)
  return jnp.stack([grp, lo, hi]).astype(jnp.int32)


def gmm_work_ratio(group_sizes, k: int, n: int, block_sizes: BlockSizes) -> float:
  """Issued MMA work of gmm over its useful FLOPs, counted from its tile list and loop bounds (the
  backward's dx = gmm(dy, w^T) visits the same tiles)."""
  gs = np.maximum(np.asarray(group_sizes, np.int64), 0)
  bm, small = block_sizes.block_m, block_sizes.block_m_small
  bn, bk = block_sizes.block_n, block_sizes.block_k
  full, rest = gs // bm, gs % bm
  rows_issued = full * bm + np.where(rest == 0, 0, np.where((rest <= small), small, bm))
  issued = rows_issued.sum() * _common.round_up(k, bk) * _common.round_up(n, bn)
  return float(issued / max(gs.sum() * k * n, 1))


def tgmm_work_ratio(group_sizes, k: int, n: int, block_sizes: BlockSizes) -> float:
  """Issued MMA work of tgmm over its useful FLOPs, counted from its grid and loop bounds."""
  gs = np.maximum(np.asarray(group_sizes, np.int64), 0)
  bm = block_sizes.block_m_t
  rows_issued = (-(-gs // bm) * bm).sum()
  issued = (rows_issued * _common.round_up(k, block_sizes.block_k_t)
            * _common.round_up(n, block_sizes.block_n_t))
  return float(issued / max(gs.sum() * k * n, 1))


def _gmm_call(x, w, group_sizes, bs: BlockSizes, interpret: bool, transpose_rhs: bool):
  """out[M, N] = x @ w[g] (w [G,K,N]) or x @ w[g]^T (transpose_rhs, w [G,N,K])."""
  m, k = x.shape
  g = w.shape[0]
  n = w.shape[1] if transpose_rhs else w.shape[2]
  bm = _common.fit_block(bs.block_m, m)
  small = bs.block_m_small if bs.block_m_small and bs.block_m_small < bm else 0
  bk = _common.fit_block(bs.block_k, k)
  bn = _common.fit_block(bs.block_n, n)
  # Rows are never padded (loads are masked) unless x has fewer rows than one tile.
  mp, kp, np_ = max(m, bm), _common.round_up(k, bk), _common.round_up(n, bn)
  xp = _pad2(x, mp, kp)
  if transpose_rhs:
    wp = jnp.pad(w, ((0, 0), (0, np_ - n), (0, kp - k))) if (np_ != n or kp != k) else w
  else:
    wp = jnp.pad(w, ((0, 0), (0, kp - k), (0, np_ - n))) if (np_ != n or kp != k) else w
  tiles = _gmm_tiles(group_sizes, mp, bm)
  full = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * a.ndim)
  out = pl.pallas_call(
      functools.partial(gmm_kernel, block_m=bm, block_m_small=small, block_k=bk, block_n=bn,
                        transpose_rhs=transpose_rhs, precision=_common.dot_precision(x.dtype)),
      grid=(tiles.shape[1], np_ // bn),
      in_specs=[full(tiles), full(xp), full(wp)],
      out_specs=pl.BlockSpec((mp, np_), lambda t, j: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="gmm",
  )(tiles, xp, wp)
  return out[:m, :n] if (mp, np_) != (m, n) else out


def _tgmm_call(x, dy, group_sizes, bs: BlockSizes, interpret: bool):
  m, k = x.shape
  n = dy.shape[1]
  g = group_sizes.shape[0]
  bm = _common.fit_block(bs.block_m_t, m)
  bk = _common.fit_block(bs.block_k_t, k)
  bn = _common.fit_block(bs.block_n_t, n)
  mp, kp, np_ = max(m, bm), _common.round_up(k, bk), _common.round_up(n, bn)
  offsets = _offsets(jnp.maximum(group_sizes, 0))
  out = pl.pallas_call(
      functools.partial(tgmm_kernel, block_m=bm, precision=_common.dot_precision(x.dtype)),
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
  return out[:, :k, :n] if (kp, np_) != (k, n) else out


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
  bs = block_sizes or BlockSizes.get_default(dtype=x.dtype)
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
  bs = block_sizes or BlockSizes.get_default(dtype=x.dtype)
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
