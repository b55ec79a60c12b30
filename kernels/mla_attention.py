"""Flash attention for MLA prefill and training: q/k head dim (192) may differ from v head dim (128).

Algorithm (FlashAttention-2):
  1. forward: the grid runs over (query block, batch, head); each program streams key/value blocks,
     keeps a running max `m`, running sum `l` and an unnormalized fp32 accumulator, and writes the
     output and the log-sum-exp `lse = m + log(l)`;
  2. backward: `delta = rowsum(out * dout)`; one kernel per key block recomputes
     `p = exp(s - lse)` for every query block and accumulates dk, dv; a second kernel per query block
     accumulates dq. Nothing of size S x S is ever stored.

Float32 inputs multiply in full float32 (`_common.dot_precision`), never TF32.

Lowering: Pallas' Triton backend (`pl.pallas_call` with `plgpu.CompilerParams`). It exists and
behaves the same in jax 0.10 and 0.11, runs on every CUDA GPU from Ampere on, and needs no
warp-group specific code, where the Mosaic GPU backend targets Hopper only and still changes its API
between releases. On CPU the same kernels run in interpret mode.

Shapes that are not a multiple of the blocks are padded inside the wrapper and masked with iota
comparisons; head dims that are not a power of two are read as aligned power-of-two column chunks
(see `kernels._common.pow2_chunks`). Queries may be fewer than keys (Sq <= Sk); with `causal` the
queries are aligned to the end of the keys (query i sits at key position Sk - Sq + i).
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two) of the forward and the two backward kernels.

  Attributes:
    block_q, block_k: query / key rows per tile of the forward kernel.
    block_q_dkv, block_k_dkv: tiles of the dk/dv kernel (grid over key blocks).
    block_q_dq, block_k_dq: tiles of the dq kernel (grid over query blocks).
    num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
      _common.check_pow2(f"BlockSizes.{f}", getattr(self, f))

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=None) -> "BlockSizes":
    """Defaults per backend (H100/H200-sized tiles on GPU, small tiles for interpret mode) and dtype:
    float32 tiles hold twice the bytes and its full-precision dots run on the FMA units, so they
    are smaller (within Hopper's 232,448 B of shared memory and 255 registers, docs/gpu.md)."""
    backend = backend or _common.backend()
    if backend == "gpu":
      if dtype is not None and jnp.dtype(dtype).itemsize >= 4:
        return cls(block_q=32, block_k=32, block_q_dkv=16, block_k_dkv=32, block_q_dq=16,
                   block_k_dq=16, num_warps=8, num_stages=1)
      return cls()
    return cls(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32,
               block_k_dq=32, num_warps=4, num_stages=1)


def _prec(x):
  return _common.dot_precision(x.dtype)


def _load_chunks(ref, rows, chunks):
  return [ref[rows, pl.ds(start, size)] for start, size in chunks]


def _scores(q_parts, k_parts, sm_scale):
  """sm_scale * q k^T in fp32, summed over the head-dim chunks."""
  s = None
  for qc, kc in zip(q_parts, k_parts):
    d = lax.dot_general(qc, kc, (((1,), (1,)), ((), ())), precision=_prec(qc),
                        preferred_element_type=_F32)
    s = d if s is None else s + d
  return s * sm_scale


def _mask(q_idx, k_idx, *, causal, offset, sq, sk, check_q, check_k):
  """Boolean [bq, bk] mask or None; only the checks the static shapes need are emitted."""
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = _and(mask, q_idx[:, None] + offset >= k_idx[None, :])
  if check_k:
    mask = _and(mask, k_idx[None, :] < sk)
  if check_q:
    mask = _and(mask, q_idx[:, None] < sq)
  return mask


def _causal_k_blocks(q_end, offset, block_k, num_k_blocks):
  """Number of key blocks a causal query block ending (exclusively) at q_end must visit."""
  return jnp.minimum(lax.div(q_end + offset + block_k - 1, block_k), num_k_blocks)


def flash_attention_forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, causal,
                                   offset, sq, sk, block_q, block_k, qk_chunks, v_chunks):
  """One (query block, batch, head): stream all visible key blocks with an online softmax."""
  i = pl.program_id(0)
  num_k_blocks = k_ref.shape[0] // block_k
  q_parts = _load_chunks(q_ref, slice(None), qk_chunks)
  q_idx = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)

  def body(j, carry):
    m_prev, l_prev, accs = carry
    rows = pl.ds(j * block_k, block_k)
    s = _scores(q_parts, _load_chunks(k_ref, rows, qk_chunks), sm_scale)
    k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    mask = _mask(q_idx, k_idx, causal=causal, offset=offset, sq=sq, sk=sk, check_q=False,
                 check_k=sk % block_k != 0)
    if mask is not None:
      s = jnp.where(mask, s, _common.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    v_parts = _load_chunks(v_ref, rows, v_chunks)
    accs = tuple(a * alpha[:, None] + jnp.dot(p.astype(vc.dtype), vc, precision=_prec(vc), preferred_element_type=_F32)
                 for a, vc in zip(accs, v_parts))
    return m_new, l_new, accs

  m0 = jnp.full((block_q,), _common.MASK_VALUE, _F32)
  l0 = jnp.zeros((block_q,), _F32)
  accs0 = tuple(jnp.zeros((block_q, size), _F32) for _, size in v_chunks)
  upper = (_causal_k_blocks((i + 1) * block_q, offset, block_k, num_k_blocks) if causal
           else num_k_blocks)
  m, l, accs = lax.fori_loop(0, upper, body, (m0, l0, accs0))
  # Every real query row sees at least key 0, so l > 0 there; padded rows are sliced off.
  l_safe = jnp.where(l > 0.0, l, 1.0)
  for (start, size), a in zip(v_chunks, accs):
    o_ref[:, pl.ds(start, size)] = (a / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def flash_attention_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                               sm_scale, causal, offset, sq, sk, block_q, block_k, qk_chunks,
                               v_chunks):
  """One (key block, batch, head): dv = sum_q p^T do, dk = sum_q ds^T q * scale."""
  j = pl.program_id(0)
  num_q_blocks = q_ref.shape[0] // block_q
  k_parts = _load_chunks(k_ref, slice(None), qk_chunks)
  v_parts = _load_chunks(v_ref, slice(None), v_chunks)
  k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)

  def body(i, carry):
    dks, dvs = carry
    rows = pl.ds(i * block_q, block_q)
    q_parts = _load_chunks(q_ref, rows, qk_chunks)
    do_parts = _load_chunks(do_ref, rows, v_chunks)
    s = _scores(q_parts, k_parts, sm_scale)
    q_idx = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    p = jnp.exp(s - lse_ref[rows][:, None])
    mask = _mask(q_idx, k_idx, causal=causal, offset=offset, sq=sq, sk=sk,
                 check_q=sq % block_q != 0, check_k=sk % block_k != 0)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = None
    for doc, vc in zip(do_parts, v_parts):
      d = lax.dot_general(doc, vc, (((1,), (1,)), ((), ())), precision=_prec(vc),
                          preferred_element_type=_F32)
      dp = d if dp is None else dp + d
    ds = p * (dp - delta_ref[rows][:, None])
    dvs = tuple(acc + lax.dot_general(p.astype(doc.dtype), doc, (((0,), (0,)), ((), ())),
                                      precision=_prec(doc), preferred_element_type=_F32)
                for acc, doc in zip(dvs, do_parts))
    dks = tuple(acc + lax.dot_general(ds.astype(qc.dtype), qc, (((0,), (0,)), ((), ())),
                                      precision=_prec(qc), preferred_element_type=_F32)
                for acc, qc in zip(dks, q_parts))
    return dks, dvs

  # Causal: query row i sees key j iff i + offset >= j, so earlier query blocks see nothing here.
  lower = jnp.maximum(j * block_k - offset, 0) // block_q if causal else 0
  dks0 = tuple(jnp.zeros((block_k, size), _F32) for _, size in qk_chunks)
  dvs0 = tuple(jnp.zeros((block_k, size), _F32) for _, size in v_chunks)
  dks, dvs = lax.fori_loop(lower, num_q_blocks, body, (dks0, dvs0))
  for (start, size), acc in zip(qk_chunks, dks):
    dk_ref[:, pl.ds(start, size)] = (acc * sm_scale).astype(dk_ref.dtype)
  for (start, size), acc in zip(v_chunks, dvs):
    dv_ref[:, pl.ds(start, size)] = acc.astype(dv_ref.dtype)


def flash_attention_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, sm_scale,
                              causal, offset, sq, sk, block_q, block_k, qk_chunks, v_chunks):
  """One (query block, batch, head): dq = sum_k ds k * scale."""
  i = pl.program_id(0)
  num_k_blocks = k_ref.shape[0] // block_k
  q_parts = _load_chunks(q_ref, slice(None), qk_chunks)
  do_parts = _load_chunks(do_ref, slice(None), v_chunks)
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_idx = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)

  def body(j, dqs):
    rows = pl.ds(j * block_k, block_k)
    k_parts = _load_chunks(k_ref, rows, qk_chunks)
    v_parts = _load_chunks(v_ref, rows, v_chunks)
    s = _scores(q_parts, k_parts, sm_scale)
    k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    p = jnp.exp(s - lse[:, None])
    mask = _mask(q_idx, k_idx, causal=causal, offset=offset, sq=sq, sk=sk, check_q=False,
                 check_k=sk % block_k != 0)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = None
    for doc, vc in zip(do_parts, v_parts):
      d = lax.dot_general(doc, vc, (((1,), (1,)), ((), ())), precision=_prec(vc),
                          preferred_element_type=_F32)
      dp = d if dp is None else dp + d
    ds = p * (dp - delta[:, None])
    return tuple(acc + jnp.dot(ds.astype(kc.dtype), kc, precision=_prec(kc),
                                 preferred_element_type=_F32)
                 for acc, kc in zip(dqs, k_parts))

  upper = (_causal_k_blocks((i + 1) * block_q, offset, block_k, num_k_blocks) if causal
           else num_k_blocks)
  dqs0 = tuple(jnp.zeros((block_q, size), _F32) for _, size in qk_chunks)
  dqs = lax.fori_loop(0, upper, body, dqs0)
  for (start, size), acc in zip(qk_chunks, dqs):
    dq_ref[:, pl.ds(start, size)] = (acc * sm_scale).astype(dq_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static geometry of one call: true and padded lengths, fitted blocks, head-dim chunks."""
  sq: int
  sk: int
  sq_pad: int
  sk_pad: int
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int
  qk_chunks: tuple
  v_chunks: tuple
  offset: int


def _plan(q, k, v, bs: BlockSizes) -> _Plan:
  sq, sk = q.shape[1], k.shape[1]
  fq = lambda b: _common.fit_block(b, sq)
  fk = lambda b: _common.fit_block(b, sk)
  blocks = dict(block_q=fq(bs.block_q), block_k=fk(bs.block_k), block_q_dkv=fq(bs.block_q_dkv),
                block_k_dkv=fk(bs.block_k_dkv), block_q_dq=fq(bs.block_q_dq),
                block_k_dq=fk(bs.block_k_dq))
  mq = max(blocks["block_q"], blocks["block_q_dkv"], blocks["block_q_dq"])
  mk = max(blocks["block_k"], blocks["block_k_dkv"], blocks["block_k_dq"])
  return _Plan(sq=sq, sk=sk, sq_pad=_common.round_up(sq, mq), sk_pad=_common.round_up(sk, mk),
               qk_chunks=_common.pow2_chunks(q.shape[-1]), v_chunks=_common.pow2_chunks(v.shape[-1]),
               offset=sk - sq, **blocks)


def _pad_seq(x, length):
  if x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _common_kwargs(plan, sm_scale, causal):
  return dict(sm_scale=sm_scale, causal=causal, offset=plan.offset, sq=plan.sq, sk=plan.sk,
              qk_chunks=plan.qk_chunks, v_chunks=plan.v_chunks)


def _fwd_call(q, k, v, sm_scale, causal, bs, interpret):
  """Runs the forward kernel; returns (out [B,Sq,H,Dv], lse [B,H,Sq_pad] fp32, plan)."""
  plan = _plan(q, k, v, bs)
  b, _, h, dqk = q.shape
  dv = v.shape[-1]
  qp, kp, vp = _pad_seq(q, plan.sq_pad), _pad_seq(k, plan.sk_pad), _pad_seq(v, plan.sk_pad)
  bq = plan.block_q
  kernel = functools.partial(flash_attention_forward_kernel, block_q=bq, block_k=plan.block_k,
                             **_common_kwargs(plan, sm_scale, causal))
  out, lse = pl.pallas_call(
      kernel,
      grid=(plan.sq_pad // bq, b, h),
      in_specs=[
          pl.BlockSpec((None, bq, None, dqk), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, plan.sk_pad, None, dqk), lambda i, bi, hi: (bi, 0, hi, 0)),
          pl.BlockSpec((None, plan.sk_pad, None, dv), lambda i, bi, hi: (bi, 0, hi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, dv), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, plan.sq_pad, h, dv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, plan.sq_pad), _F32)],
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="mla_flash_forward",
  )(qp, kp, vp)
  return out[:, :plan.sq], lse, plan


def _bwd_call(q, k, v, out, lse, do, sm_scale, causal, bs, interpret):
  """Runs the dk/dv and dq kernels from the saved log-sum-exp."""
  plan = _plan(q, k, v, bs)
  b, _, h, dqk = q.shape
  dv = v.shape[-1]
  # delta_i = sum_d out_id * dout_id: the softmax-Jacobian term, one fp32 per query row.
  delta = jnp.einsum("BSHD,BSHD->BHS", out.astype(_F32), do.astype(_F32))
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, plan.sq_pad - plan.sq)))
  qp, kp, vp = _pad_seq(q, plan.sq_pad), _pad_seq(k, plan.sk_pad), _pad_seq(v, plan.sk_pad)
  dop = _pad_seq(do.astype(q.dtype), plan.sq_pad)
  params = plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
  kw = _common_kwargs(plan, sm_scale, causal)

  full_q = lambda d: pl.BlockSpec((None, plan.sq_pad, None, d), lambda j, bi, hi: (bi, 0, hi, 0))
  full_k = lambda d: pl.BlockSpec((None, plan.sk_pad, None, d), lambda j, bi, hi: (bi, 0, hi, 0))
  full_row = pl.BlockSpec((None, None, plan.sq_pad), lambda j, bi, hi: (bi, hi, 0))

  bk = plan.block_k_dkv
  blk_k = lambda d: pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))
  dk, dv_ = pl.pallas_call(
      functools.partial(flash_attention_dkv_kernel, block_q=plan.block_q_dkv, block_k=bk, **kw),
      grid=(plan.sk_pad // bk, b, h),
      in_specs=[full_q(dqk), blk_k(dqk), blk_k(dv), full_q(dv), full_row, full_row],
      out_specs=[blk_k(dqk), blk_k(dv)],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="mla_flash_dkv",
  )(qp, kp, vp, dop, lse, delta)

  bq = plan.block_q_dq
  blk_q = lambda d: pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  blk_row = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  dq = pl.pallas_call(
      functools.partial(flash_attention_dq_kernel, block_q=bq, block_k=plan.block_k_dq, **kw),
      grid=(plan.sq_pad // bq, b, h),
      in_specs=[blk_q(dqk), full_k(dqk), full_k(dv), blk_q(dv), blk_row, blk_row],
      out_specs=blk_q(dqk),
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="mla_flash_dq",
  )(qp, kp, vp, dop, lse, delta)
  return dq[:, :plan.sq], dk[:, :plan.sk], dv_[:, :plan.sk]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, sm_scale, causal, bs, interpret):
  return _fwd_call(q, k, v, sm_scale, causal, bs, interpret)[0]


def _flash_fwd(q, k, v, sm_scale, causal, bs, interpret):
  out, lse, _ = _fwd_call(q, k, v, sm_scale, causal, bs, interpret)
  return out, (q, k, v, out, lse)


def _flash_bwd(sm_scale, causal, bs, interpret, res, do):
  q, k, v, out, lse = res
  return _bwd_call(q, k, v, out, lse, do, sm_scale, causal, bs, interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, causal: bool = True, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Multi-head attention with a blocked online softmax; differentiable (custom_vjp).

  Args:
    q: [B, Sq, H, Dqk] queries (fp32 or bf16).
    k: [B, Sk, H, Dqk] keys, Sk >= Sq.
    v: [B, Sk, H, Dv] values; Dv may differ from Dqk (DeepSeek: 192 / 128).
    causal: mask keys after each query; queries are aligned to the end of the keys.
    sm_scale: logit scale, default Dqk**-0.5 (fold YaRN's mscale**2 in here). A Python float.
    block_sizes: tile sizes; default `BlockSizes.get_default()` for the backend and q's dtype.
    interpret: run Pallas in interpret mode; None means interpret on CPU only.

  Returns:
    [B, Sq, H, Dv] in v's dtype; softmax statistics and accumulation are fp32.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B,S,H,D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: batch/heads/key length disagree")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
  if q.shape[1] > k.shape[1]:
    raise ValueError(f"query length {q.shape[1]} exceeds key length {k.shape[1]}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  bs = block_sizes or BlockSizes.get_default(dtype=q.dtype)
  return _flash(q, k, v, scale, bool(causal), bs, _common.resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def flash_attention_reference(q, k, v, *, causal: bool = True, sm_scale: float | None = None):
  """Plain jnp attention with the same contract as `flash_attention` (fp32 softmax).

  Args:
    q: [B, Sq, H, Dqk]; k: [B, Sk, H, Dqk]; v: [B, Sk, H, Dv].
    causal: mask keys after each query (queries aligned to the end of the keys).
    sm_scale: logit scale, default Dqk**-0.5.

  Returns:
    [B, Sq, H, Dv] in v's dtype.
  """
  scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  s = jnp.einsum("BSHD,BTHD->BHST", q, k, preferred_element_type=_F32) * scale
  if causal:
    sq, sk = q.shape[1], k.shape[1]
    keep = jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :]
    s = jnp.where(keep, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("BHST,BTHD->BSHD", p.astype(v.dtype), v,
                    preferred_element_type=_F32).astype(v.dtype)
