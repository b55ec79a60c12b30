"""Absorbed MLA decode over the latent KV cache (flash-decoding).

In the absorbed form every head attends to the same cache rows: the key of cache position t is
[c_kv_t ; k_pe_t] and its value is c_kv_t itself, so the H heads (times the Sq new queries) act like
H * Sq query rows of one shared-KV attention:

  out[b, i, h] = softmax_t(sm_scale * (q_c[b,i,h] . c_kv[b,t] + q_pe[b,i,h] . k_pe[b,t])) @ c_kv[b]

over t <= lengths[b] - Sq + i (query i is the i-th of the last Sq valid positions).

Algorithm:
  1. the query rows of one batch row are flattened to [Sq*H, Dc] (a free reshape) and cut into row
     blocks; the cache is cut into `num_splits` contiguous splits;
  2. the grid runs over (row block, split, batch); a program streams the key blocks of its split
     that lie below the row's length (the loop bound is dynamic, so blocks past the length are
     never read) and writes a partial (unnormalized out, max, sum) in fp32;
  3. a combine step (plain jnp, it touches only B x splits x rows numbers) rescales the partials to
     the common max and normalizes.
The row block is the fastest grid axis, so the programs that read the same cache split run side by
side and the cache comes from HBM about once.

Float32 inputs multiply in full float32 (`_common.dot_precision`), never TF32.

Lowering: Pallas' Triton backend, as in `kernels.mla_attention` (same API across jax 0.10 / 0.11,
any CUDA GPU from Ampere on; Mosaic GPU is Hopper-only and still moving). Interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import _common

_F32 = jnp.float32
# Programs to aim for when the split count is chosen automatically (a few waves of 132 SMs).
_TARGET_PROGRAMS = 528


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) and split count of the decode kernel.

  Attributes:
    block_rows: query rows (flattened Sq*H) per program.
    block_k: cache rows per inner step.
    num_splits: cache splits per batch row; None picks enough to fill the GPU.
    min_split: smallest number of cache rows per split when choosing automatically.
    num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  """
  block_rows: int = 64
  block_k: int = 32
  num_splits: int | None = None
  min_split: int = 512
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    _common.check_pow2("BlockSizes.block_rows", self.block_rows)
    _common.check_pow2("BlockSizes.block_k", self.block_k)
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"BlockSizes.num_splits={self.num_splits} must be >= 1")

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=None) -> "BlockSizes":
    """Defaults per backend (H100/H200-sized tiles on GPU, small tiles for interpret mode) and dtype
    (float32 cache tiles hold twice the bytes: fewer rows per step; docs/gpu.md)."""
    backend = backend or _common.backend()
    if backend == "gpu":
      if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        return cls(block_rows=32, block_k=16, num_warps=8, num_stages=2)
      return cls()
    return cls(block_rows=32, block_k=32, num_splits=2, min_split=32, num_warps=4, num_stages=1)


def mla_decode_kernel(len_ref, qc_ref, qpe_ref, ckv_ref, kpe_ref, o_ref, m_ref, l_ref, *, sm_scale,
                      num_heads, num_queries, block_rows, block_k, c_chunks, r_chunks):
  """One (row block, split, batch row): online softmax over the split's valid cache blocks."""
  r, s = pl.program_id(0), pl.program_id(1)
  split_len = ckv_ref.shape[0]
  length = len_ref[()]
  qc = [qc_ref[:, pl.ds(a, n)] for a, n in c_chunks]
  qpe = [qpe_ref[:, pl.ds(a, n)] for a, n in r_chunks]
  rows = r * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
  # Row r*Bh + h is query i = row // H, which sits at cache index length - Sq + i.
  last = length - num_queries + rows // num_heads
  split_start = s * split_len

  def body(j, carry):
    m_prev, l_prev, accs = carry
    kr = pl.ds(j * block_k, block_k)
    t = split_start + j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    # Cache rows at or past the length may hold anything (stale, NaN; 0 * NaN would leak into
    # the sums): they are masked at the load and read as 0.
    in_cache = (t < length)[:, None]
    ck = [plgpu.load(ckv_ref.at[kr, pl.ds(a, n)], mask=in_cache, other=0) for a, n in c_chunks]
    kp = [plgpu.load(kpe_ref.at[kr, pl.ds(a, n)], mask=in_cache, other=0) for a, n in r_chunks]
    sc = None
    for x, y in zip(qc + qpe, ck + kp):
      d = lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=_common.dot_precision(x.dtype),
                          preferred_element_type=_F32)
      sc = d if sc is None else sc + d
    sc = sc * sm_scale
    mask = t[None, :] <= last[:, None]
    sc = jnp.where(mask, sc, _common.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    # The where keeps rows with no visible key at exactly zero weight (their max is MASK_VALUE).
    p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    accs = tuple(a * alpha[:, None] + jnp.dot(p.astype(c.dtype), c,
                                              precision=_common.dot_precision(c.dtype),
                                              preferred_element_type=_F32)
                 for a, c in zip(accs, ck))
    return m_new, l_new, accs

  m0 = jnp.full((block_rows,), _common.MASK_VALUE, _F32)
  l0 = jnp.zeros((block_rows,), _F32)
  accs0 = tuple(jnp.zeros((block_rows, n), _F32) for _, n in c_chunks)
  # Blocks at or past the row's length are never visited.
  num_blocks = jnp.clip(lax.div(length - split_start + block_k - 1, block_k), 0,
                        split_len // block_k)
  m, l, accs = lax.fori_loop(0, num_blocks, body, (m0, l0, accs0))
  for (a, n), acc in zip(c_chunks, accs):
    o_ref[:, pl.ds(a, n)] = acc
  m_ref[...] = m
  l_ref[...] = l


def _combine(o, m, l):
  """Merges split partials: o [B,P,R,Dc], m, l [B,P,R] -> [B,R,Dc] fp32 (0 where nothing is seen)."""
  m_all = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp(m - m_all)
  denom = jnp.sum(w * l, axis=1)
  num = jnp.einsum("BPR,BPRD->BRD", w, o)
  return jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)


def _num_splits(bs: BlockSizes, batch: int, row_blocks: int, cache_len: int) -> int:
  if bs.num_splits is not None:
    return max(1, min(bs.num_splits, _common.cdiv(cache_len, bs.block_k)))
  want = _common.cdiv(_TARGET_PROGRAMS, batch * row_blocks)
  most = max(1, cache_len // max(bs.min_split, bs.block_k))
  return max(1, min(want, most))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def mla_decode(q_c, q_pe, c_kv, k_pe, lengths, *, sm_scale: float,
               block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Absorbed MLA attention of the last Sq positions over a latent cache. Forward only.

  Args:
    q_c: [B, Sq, H, Dc] queries absorbed into the latent space (q_nope @ W_uk).
    q_pe: [B, Sq, H, Dr] rotary part of the queries.
    c_kv: [B, T, Dc] latent cache (key and value), shared by all heads.
    k_pe: [B, T, Dr] rotary key cache, shared by all heads.
    lengths: [B] int32 valid cache length per row (Sq <= lengths <= T); query i sits at cache index
      lengths - Sq + i and sees cache rows up to and including it. A query with no visible row
      (lengths < Sq) returns zeros.
    sm_scale: logit scale (a Python float; (Dn + Dr)**-0.5 times YaRN's mscale**2 for DeepSeek).
    block_sizes: tile sizes and split count; default `BlockSizes.get_default()`.
    interpret: run Pallas in interpret mode; None means interpret on CPU only.

  Returns:
    [B, Sq, H, Dc] in c_kv's dtype (apply W_uv afterwards).
  """
  b, sq, h, dc = q_c.shape
  dr = q_pe.shape[-1]
  t = c_kv.shape[1]
  if q_pe.shape[:3] != (b, sq, h):
    raise ValueError(f"q_pe {q_pe.shape} does not match q_c {q_c.shape} in [B,Sq,H]")
  if c_kv.shape != (b, t, dc) or k_pe.shape != (b, t, dr):
    raise ValueError(f"c_kv {c_kv.shape} / k_pe {k_pe.shape} must be [B,T,Dc] / [B,T,Dr] with "
                     f"B={b}, Dc={dc}, Dr={dr}")
  if lengths.shape != (b,):
    raise ValueError(f"lengths must be [B]={b}, got {lengths.shape}")
  if not (q_c.dtype == q_pe.dtype == c_kv.dtype == k_pe.dtype):
    raise ValueError(f"dtypes differ: q_c {q_c.dtype}, q_pe {q_pe.dtype}, c_kv {c_kv.dtype}, "
                     f"k_pe {k_pe.dtype}")
  bs = block_sizes or BlockSizes.get_default(dtype=c_kv.dtype)
  interpret = _common.resolve_interpret(interpret)

  rows = sq * h
  block_rows = _common.fit_block(bs.block_rows, rows)
  rows_pad = _common.round_up(rows, block_rows)
  row_blocks = rows_pad // block_rows
  block_k = _common.fit_block(bs.block_k, t)
  splits = _num_splits(bs, b, row_blocks, t)
  split_len = _common.round_up(_common.cdiv(t, splits), block_k)
  t_pad = split_len * splits

  def pad_rows(x):
    x = x.reshape(b, rows, x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, rows_pad - rows), (0, 0))) if rows_pad != rows else x

  def pad_cache(x):
    # Only shapes that do not split evenly pay for this copy; the kernel never reads past lengths.
    return jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0))) if t_pad != t else x

  kernel = functools.partial(
      mla_decode_kernel, sm_scale=float(sm_scale), num_heads=h, num_queries=sq,
      block_rows=block_rows, block_k=block_k, c_chunks=_common.pow2_chunks(dc),
      r_chunks=_common.pow2_chunks(dr))
  o, m, l = pl.pallas_call(
      kernel,
      grid=(row_blocks, splits, b),
      in_specs=[
          pl.BlockSpec((None,), lambda r, s, bi: (bi,)),
          pl.BlockSpec((None, block_rows, dc), lambda r, s, bi: (bi, r, 0)),
          pl.BlockSpec((None, block_rows, dr), lambda r, s, bi: (bi, r, 0)),
          pl.BlockSpec((None, split_len, dc), lambda r, s, bi: (bi, s, 0)),
          pl.BlockSpec((None, split_len, dr), lambda r, s, bi: (bi, s, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_rows, dc), lambda r, s, bi: (bi, s, r, 0)),
          pl.BlockSpec((None, None, block_rows), lambda r, s, bi: (bi, s, r)),
          pl.BlockSpec((None, None, block_rows), lambda r, s, bi: (bi, s, r)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, splits, rows_pad, dc), _F32),
                 jax.ShapeDtypeStruct((b, splits, rows_pad), _F32),
                 jax.ShapeDtypeStruct((b, splits, rows_pad), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="mla_decode",
  )(jnp.asarray(lengths, jnp.int32), pad_rows(q_c), pad_rows(q_pe), pad_cache(c_kv),
    pad_cache(k_pe))
  out = _combine(o, m, l)[:, :rows]
  return out.reshape(b, sq, h, dc).astype(c_kv.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def mla_decode_reference(q_c, q_pe, c_kv, k_pe, lengths, *, sm_scale: float):
  """Plain jnp absorbed MLA decode with the same contract as `mla_decode`.

  Args:
    q_c: [B, Sq, H, Dc]; q_pe: [B, Sq, H, Dr]; c_kv: [B, T, Dc]; k_pe: [B, T, Dr].
    lengths: [B] int32 valid cache lengths.
    sm_scale: logit scale.

  Returns:
    [B, Sq, H, Dc] in c_kv's dtype; zeros for queries that see no cache row.
  """
  sq, t = q_c.shape[1], c_kv.shape[1]
  s = (jnp.einsum("BSHC,BTC->BSHT", q_c, c_kv, preferred_element_type=_F32)
       + jnp.einsum("BSHR,BTR->BSHT", q_pe, k_pe, preferred_element_type=_F32)) * sm_scale
  last = lengths[:, None] - sq + jnp.arange(sq)[None, :]                       # [B, Sq]
  keep = jnp.arange(t)[None, None, None, :] <= last[:, :, None, None]          # [B, Sq, 1, T]
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(keep, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("BSHT,BTC->BSHC", p.astype(c_kv.dtype), c_kv, preferred_element_type=_F32)
  return out.astype(c_kv.dtype)
