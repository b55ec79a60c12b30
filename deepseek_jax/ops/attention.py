"""Attention for the naive (training / prefill) MLA path: chunked XLA attention, the Pallas flash kernel, or
the opt-in host kernel; with a cache, the reference.

Masking rule used throughout the model: query i attends to key slot j iff j <= q_slots[b, i], where q_slots
is the query's own slot in the key sequence (arange(S) without a cache; its cache index with one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.ops.per_shard import per_shard

IMPLS = ("xla", "pallas", "host")

# Query rows per chunk of `causal_attention`: each chunk scores only the keys at or before its last row, so
# the masked upper triangle is mostly skipped; at most this many chunks (the loop is unrolled).
CAUSAL_CHUNK_ROWS = 64
MAX_CAUSAL_CHUNKS = 8


def slot_mask(q_slots, num_keys: int):
  """[B, 1, S, T] boolean mask: key j visible to query i iff j <= q_slots[b, i]."""
  keys = jnp.arange(num_keys, dtype=jnp.int32)
  return (keys[None, None, :] <= q_slots[:, :, None])[:, None]


def mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_slots=None):
  """MLA's naive attention without materializing per-head rope keys: the score is
  q_nope . k_nope (per head) + q_pe . k_pe (k_pe [B,T,Dr] shared by all heads).  -> [B,S,H,Dv]."""
  b, s = q_nope.shape[:2]
  t = k_nope.shape[1]
  if q_slots is None:
    q_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + (t - s), (b, s))
  # Heads-major operands: XLA:CPU runs these batched matmuls faster than with heads inside.
  q_nope, q_pe, k_nope, v = (a.transpose(0, 2, 1, 3) for a in (q_nope, q_pe, k_nope, v))
  logits = (jnp.einsum("BHSN,BHTN->BHST", q_nope, k_nope, preferred_element_type=jnp.float32)
            + jnp.einsum("BHSR,BTR->BHST", q_pe, k_pe, preferred_element_type=jnp.float32)) * scale
  logits = jnp.where(slot_mask(q_slots, t), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BHST,BHTV->BHSV", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).astype(q_nope.dtype)


def _chunks(s: int):
  """(start, end) query rows of each chunk of a length-s causal attention."""
  n = max(1, min(MAX_CAUSAL_CHUNKS, s // CAUSAL_CHUNK_ROWS))
  c = -(-s // n)
  return [(a, min(s, a + c)) for a in range(0, s, c)]


def _causal_bias(a: int, b: int):
  """[b - a, b] additive mask of query rows a..b-1 over keys 0..b-1 (0 where visible, -inf above the
  diagonal), a constant: XLA:CPU adds it inside the softmax's fusion, while a `where` on an iota compare
  costs a separate pass."""
  visible = np.arange(b)[None, :] <= np.arange(a, b)[:, None]
  return jnp.asarray(np.where(visible, 0.0, -np.inf).astype(np.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_heads_major(q, k, v, scale):
  """Causal softmax(scale q k^T) v on heads-major q, k [B,H,S,K], v [B,H,S,V] -> fp32 [B,H,S,V]."""
  return _causal_fwd(q, k, v, scale)[0]


def _causal_fwd(q, k, v, scale):
  # Transposed operands ([B,H,K,T]) are made explicitly, so that every product is a plain (NN) matmul.
  t = lambda a: jnp.swapaxes(a, 2, 3)
  outs, probs = [], []
  for a, b in _chunks(q.shape[2]):
    logits = jnp.einsum("BHSK,BHKT->BHST", q[:, :, a:b], t(k[:, :, :b]),
                        preferred_element_type=jnp.float32) * scale
    logits = logits + _causal_bias(a, b)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    outs.append(jnp.einsum("BHST,BHTV->BHSV", p.astype(v.dtype), v[:, :, :b],
                           preferred_element_type=jnp.float32))
    probs.append(p)
  out = jnp.concatenate(outs, axis=2)
  return out, (q, k, v, out, probs)


def _causal_bwd(scale, res, d_out):
  q, k, v, out, probs = res
  s = q.shape[2]
  t = lambda a: jnp.swapaxes(a, 2, 3)
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True)                     # [B,H,S,1]
  dq = []
  dkt = jnp.zeros(t(k).shape, jnp.float32)                                 # [B,H,K,S]
  dvt = jnp.zeros(t(v).shape, jnp.float32)                                 # [B,H,V,S]
  for (a, b), p in zip(_chunks(s), probs):
    dp = jnp.einsum("BHSV,BHVT->BHST", d_out[:, :, a:b], t(v[:, :, :b]).astype(jnp.float32))
    ds = p * (dp - delta[:, :, a:b]) * scale
    dq.append(jnp.einsum("BHST,BHTK->BHSK", ds, k[:, :, :b].astype(jnp.float32)))
    dkt = dkt.at[..., :b].add(jnp.einsum("BHKS,BHST->BHKT", t(q[:, :, a:b]).astype(jnp.float32), ds))
    dvt = dvt.at[..., :b].add(jnp.einsum("BHVS,BHST->BHVT", t(d_out[:, :, a:b]), p))
  return (jnp.concatenate(dq, axis=2).astype(q.dtype), jnp.swapaxes(dkt, 2, 3).astype(k.dtype),
          jnp.swapaxes(dvt, 2, 3).astype(v.dtype))


_causal_heads_major.defvjp(_causal_fwd, _causal_bwd)


def causal_attention(q, k, v, *, scale: float):
  """Plain causal attention (S == T) for XLA: softmax(scale q k^T + causal mask) v, fp32 softmax.

  Queries go in chunks of about `CAUSAL_CHUNK_ROWS` rows and each chunk scores only the keys up to its
  last row, so about half of the masked triangle is never computed; the backward (a custom VJP from the
  saved probabilities) is written as plain matmuls on explicitly transposed small operands, which XLA:CPU
  runs far faster than the transposed-operand products autodiff produces.

  Args:
    q, k: [B, S, H, Dk]; v: [B, S, H, Dv].
    scale: softmax scale.
  Returns:
    [B, S, H, Dv] in q's dtype.
  """
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"causal_attention needs as many keys as queries, got {q.shape} and {k.shape}")
  heads = lambda a: a.transpose(0, 2, 1, 3)
  out = _causal_heads_major(heads(q), heads(k), heads(v), float(scale))
  return heads(out).astype(q.dtype)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_slots=None, impl: str = "xla",
                  interpret: bool | None = None):
  """MLA's naive-path attention: q = [q_nope | q_pe] per head, k = [k_nope | k_pe] with k_pe shared.

  Without a cache (q_slots None, S == T) `impl` runs it: 'xla' the chunked `causal_attention` and 'pallas'
  `kernels.mla_attention.flash_attention` (both on the parts concatenated, k_pe copied to every head), 'host'
  `kernels.host_attention` (CPU, float32).  With a cache every impl scores the two parts separately with
  `mla_attention_reference`.

  Args:
    q_nope: [B, S, H, Dn]; q_pe: [B, S, H, Dr]; k_nope: [B, T, H, Dn]; k_pe: [B, T, Dr]; v: [B, T, H, Dv].
    scale: softmax scale (YaRN's mscale already folded in).
    q_slots: [B, S] int32 slot of each query in the key sequence, or None (plain causal, S == T).
    impl: a concrete `ModelConfig.attention_impl` (`deepseek_jax.ops.impls`).
    interpret: the Pallas kernel's interpret mode (`ModelConfig.pallas_interpret`).
  Returns:
    [B, S, H, Dv] in q_nope's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r}: expected one of {IMPLS} (deepseek_jax.ops.impls resolves "
                     "'auto')")
  if q_slots is not None or q_nope.shape[1] != k_nope.shape[1]:
    return mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, scale=scale, q_slots=q_slots)
  if impl == "host":
    from kernels import host_attention  # pylint: disable=g-import-not-at-top
    return host_attention.mla_causal_attention(q_nope, q_pe, k_nope, k_pe, v, scale=scale)
  k_pe_h = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:3] + (k_pe.shape[-1],))
  q, k = jnp.concatenate([q_nope, q_pe], -1), jnp.concatenate([k_nope, k_pe_h], -1)
  if impl == "pallas":
    from kernels import mla_attention  # pylint: disable=g-import-not-at-top
    # A custom call XLA cannot split: each device runs the kernel on its own rows and heads.
    flash = lambda q, k, v: mla_attention.flash_attention(q, k, v, causal=True, sm_scale=scale,
                                                          interpret=interpret)
    return per_shard(flash, (q, k, v), ("b.h.",) * 3, "b.h.").astype(q_nope.dtype)
  return causal_attention(q, k, v, scale=scale)
