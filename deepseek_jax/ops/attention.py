"""Attention for the naive (training / prefill) MLA path: the XLA reference or the Pallas flash kernel.

Masking rule used throughout the model: query i attends to key slot j iff j <= q_slots[b, i], where q_slots
is the query's own slot in the key sequence (arange(S) without a cache; its cache index with one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.ops.backend import resolve


def slot_mask(q_slots, num_keys: int):
  """[B, 1, S, T] boolean mask: key j visible to query i iff j <= q_slots[b, i]."""
  keys = jnp.arange(num_keys, dtype=jnp.int32)
  return (keys[None, None, :] <= q_slots[:, :, None])[:, None]


def attention_reference(q, k, v, *, scale: float, q_slots=None):
  """softmax(scale * q k^T + mask) v in fp32.  q [B,S,H,Dk], k [B,T,H,Dk], v [B,T,H,Dv] -> [B,S,H,Dv]."""
  b, s = q.shape[:2]
  t = k.shape[1]
  if q_slots is None:
    q_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + (t - s), (b, s))
  logits = jnp.einsum("BSHK,BTHK->BHST", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(slot_mask(q_slots, t), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BHST,BTHV->BSHV", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_slots=None):
  """MLA's naive attention without materializing per-head rope keys: the score is
  q_nope . k_nope (per head) + q_pe . k_pe (k_pe [B,T,Dr] shared by all heads).  -> [B,S,H,Dv]."""
  b, s = q_nope.shape[:2]
  t = k_nope.shape[1]
  if q_slots is None:
    q_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + (t - s), (b, s))
  # Heads-major operands: XLA:CPU runs these batched matmuls about 2x faster than with heads inside.
  q_nope, q_pe, k_nope, v = (a.transpose(0, 2, 1, 3) for a in (q_nope, q_pe, k_nope, v))
  logits = (jnp.einsum("BHSN,BHTN->BHST", q_nope, k_nope, preferred_element_type=jnp.float32)
            + jnp.einsum("BHSR,BTR->BHST", q_pe, k_pe, preferred_element_type=jnp.float32)) * scale
  logits = jnp.where(slot_mask(q_slots, t), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BHST,BHTV->BHSV", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).astype(q_nope.dtype)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, q_slots=None, impl: str = "auto"):
  """MLA's naive-path attention: q = [q_nope | q_pe] per head, k = [k_nope | k_pe] with k_pe shared.

  The XLA path scores the two parts separately (no per-head copy of k_pe); the Pallas path concatenates
  and runs `kernels.mla_attention.flash_attention` (qk dim Dn + Dr, value dim Dv).
  """
  impl = resolve(impl, field="attention_impl")
  if impl == "pallas" and q_slots is None and q_nope.shape[1] == k_nope.shape[1]:
    k_pe_h = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:3] + (k_pe.shape[-1],))
    return attention(jnp.concatenate([q_nope, q_pe], -1), jnp.concatenate([k_nope, k_pe_h], -1), v,
                     scale=scale, impl="pallas")
  return mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, scale=scale, q_slots=q_slots)


def attention(q, k, v, *, scale: float, q_slots=None, impl: str = "auto"):
  """Causal attention with unequal qk / v head dims.

  Args:
    q: [B, S, H, Dqk]; k: [B, T, H, Dqk]; v: [B, T, H, Dv].
    scale: softmax scale (YaRN's mscale already folded in).
    q_slots: [B, S] int32 slot of each query in the key sequence, or None for plain causal attention over
      S == T (or the last S of T).
    impl: 'auto' | 'xla' | 'pallas' (`ModelConfig.attention_impl`).
  Returns:
    [B, S, H, Dv] in q's dtype.
  """
  impl = resolve(impl, field="attention_impl")
  if impl == "pallas" and q_slots is None and q.shape[1] == k.shape[1]:
    from kernels import mla_attention  # pylint: disable=g-import-not-at-top
    return mla_attention.flash_attention(q, k, v, causal=True, sm_scale=scale)
  return attention_reference(q, k, v, scale=scale, q_slots=q_slots)
