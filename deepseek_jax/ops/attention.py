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
