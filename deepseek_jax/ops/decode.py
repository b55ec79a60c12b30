"""Absorbed MLA attention over the latent cache: the XLA reference or the Pallas decode kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.ops.attention import slot_mask
from deepseek_jax.ops.backend import resolve


def absorbed_attention_reference(q_c, q_pe, c_kv, k_pe, *, scale: float, q_slots=None):
  """softmax(scale * (q_c c_kv^T + q_pe k_pe^T)) c_kv with k_pe / c_kv shared by all heads.

  q_c [B,S,H,Dc], q_pe [B,S,H,Dr], c_kv [B,T,Dc], k_pe [B,T,Dr] -> [B,S,H,Dc] (fp32 accumulation).
  """
  b, s = q_c.shape[:2]
  t = c_kv.shape[1]
  if q_slots is None:
    q_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + (t - s), (b, s))
  logits = (jnp.einsum("BSHC,BTC->BHST", q_c, c_kv, preferred_element_type=jnp.float32)
            + jnp.einsum("BSHR,BTR->BHST", q_pe, k_pe, preferred_element_type=jnp.float32)) * scale
  logits = jnp.where(slot_mask(q_slots, t), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BHST,BTC->BSHC", probs.astype(c_kv.dtype), c_kv,
                   preferred_element_type=jnp.float32)
  return out.astype(q_c.dtype)


def absorbed_attention(q_c, q_pe, c_kv, k_pe, *, scale: float, q_slots=None, impl: str = "auto"):
  """Absorbed MLA attention.  With `impl` resolving to 'pallas', `kernels.mla_decode` runs; its queries are the
  last S slots of each row's valid length, which is what contiguous `q_slots` (a cache write) give.

  Args:
    q_c, q_pe, c_kv, k_pe: see `absorbed_attention_reference`.
    scale: softmax scale.
    q_slots: [B, S] slot of each query in the cache (contiguous per row), or None (queries are the last S).
    impl: `ModelConfig.attention_impl`.
  """
  impl = resolve(impl, field="attention_impl")
  if impl == "pallas":
    from kernels import mla_decode  # pylint: disable=g-import-not-at-top
    b, s = q_c.shape[:2]
    if q_slots is None:
      lengths = jnp.full((b,), c_kv.shape[1], jnp.int32)
    else:
      lengths = q_slots[:, -1].astype(jnp.int32) + 1
    return mla_decode.mla_decode(q_c, q_pe, c_kv, k_pe, lengths, sm_scale=scale)
  return absorbed_attention_reference(q_c, q_pe, c_kv, k_pe, scale=scale, q_slots=q_slots)
