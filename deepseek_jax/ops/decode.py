"""Absorbed MLA attention over the latent cache: the reference (`kernels.mla_decode.mla_decode_reference`) or
the Pallas decode kernel."""

from __future__ import annotations

import jax.numpy as jnp

from kernels import mla_decode
from deepseek_jax.ops.per_shard import per_shard

IMPLS = ("xla", "pallas")


def absorbed_attention(q_c, q_pe, c_kv, k_pe, *, scale: float, q_slots=None, impl: str = "xla",
                       interpret: bool | None = None):
  """softmax(scale * (q_c c_kv^T + q_pe k_pe^T)) c_kv with c_kv / k_pe shared by all heads.

  The queries are the last S slots of each row's valid length, which is what contiguous `q_slots` (a cache
  write) give: 'xla' runs `kernels.mla_decode.mla_decode_reference`, 'pallas' `kernels.mla_decode.mla_decode`.

  Args:
    q_c: [B, S, H, Dc]; q_pe: [B, S, H, Dr]; c_kv: [B, T, Dc]; k_pe: [B, T, Dr].
    scale: softmax scale.
    q_slots: [B, S] slot of each query in the cache (contiguous per row), or None (queries are the last S).
    impl: a concrete `ModelConfig.decode_impl` (`deepseek_jax.ops.impls`).
    interpret: the Pallas kernel's interpret mode (`ModelConfig.pallas_interpret`).
  Returns:
    [B, S, H, Dc] in c_kv's dtype (fp32 accumulation).
  """
  if impl not in IMPLS:
    raise ValueError(f"decode impl={impl!r}: expected one of {IMPLS} (deepseek_jax.ops.impls resolves 'auto')")
  b = q_c.shape[0]
  if q_slots is None:
    lengths = jnp.full((b,), c_kv.shape[1], jnp.int32)
  else:
    lengths = q_slots[:, -1].astype(jnp.int32) + 1
  if impl == "pallas":
    # A custom call XLA cannot split: each device runs the kernel on its own rows and heads.
    decode = lambda q_c, q_pe, c_kv, k_pe, lengths: mla_decode.mla_decode(q_c, q_pe, c_kv, k_pe, lengths,
                                                                         sm_scale=scale, interpret=interpret)
    return per_shard(decode, (q_c, q_pe, c_kv, k_pe, lengths), ("b.h.", "b.h.", "b..", "b..", "b"), "b.h.")
  return mla_decode.mla_decode_reference(q_c, q_pe, c_kv, k_pe, lengths, sm_scale=float(scale))
