"""The chunked causal attention (custom VJP) against the flash kernel's masked-softmax reference
(`kernels.mla_attention.flash_attention_reference`): values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops import attention as attn
from kernels.mla_attention import flash_attention_reference


def _inputs(s, dtype, heads=2, dk=24, dv=16, batch=2):
  ks = jax.random.split(jax.random.PRNGKey(s), 4)
  q = jax.random.normal(ks[0], (batch, s, heads, dk), dtype)
  k = jax.random.normal(ks[1], (batch, s, heads, dk), dtype)
  v = jax.random.normal(ks[2], (batch, s, heads, dv), dtype)
  dout = jax.random.normal(ks[3], (batch, s, heads, dv), jnp.float32)
  return q, k, v, dout


@pytest.mark.parametrize("s", [1, 7, 130, 300])
def test_causal_attention_matches_reference(s):
  q, k, v, dout = _inputs(s, jnp.float32)
  scale = 0.3
  want, want_vjp = jax.vjp(lambda *a: flash_attention_reference(*a, causal=True, sm_scale=scale), q, k, v)
  got, got_vjp = jax.vjp(lambda *a: attn.causal_attention(*a, scale=scale), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_vjp(dout), want_vjp(dout)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_causal_attention_chunks_cover_every_row_once():
  for s in [1, 63, 64, 65, 127, 511, 512, 513, 4096, 4099]:
    chunks = attn._chunks(s)  # pylint: disable=protected-access
    assert chunks[0][0] == 0 and chunks[-1][1] == s
    assert all(a1 == b0 for (_, b0), (a1, _) in zip(chunks, chunks[1:]))
    assert len(chunks) <= attn.MAX_CAUSAL_CHUNKS


def test_causal_attention_bf16():
  q, k, v, dout = _inputs(96, jnp.bfloat16)
  want = flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                   causal=True, sm_scale=0.2)
  got = attn.causal_attention(q, k, v, scale=0.2)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=3e-2, atol=3e-2)
  grads = jax.grad(lambda *a: jnp.sum(attn.causal_attention(*a, scale=0.2).astype(jnp.float32) * dout),
                   (0, 1, 2))(q, k, v)
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_mla_attention_matches_reference_with_and_without_slots():
  b, s, h, dn, dr, dv = 2, 80, 4, 16, 8, 12
  ks = jax.random.split(jax.random.PRNGKey(1), 6)
  qn, kn = (jax.random.normal(kk, (b, s, h, dn)) for kk in ks[:2])
  qp = jax.random.normal(ks[2], (b, s, h, dr))
  kp = jax.random.normal(ks[3], (b, s, dr))
  v = jax.random.normal(ks[4], (b, s, h, dv))
  dout = jax.random.normal(ks[5], (b, s, h, dv))
  args = (qn, qp, kn, kp, v)
  want, want_vjp = jax.vjp(lambda *a: attn.mla_attention_reference(*a, scale=0.25), *args)
  got, got_vjp = jax.vjp(lambda *a: attn.mla_attention(*a, scale=0.25, impl="xla"), *args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_vjp(dout), want_vjp(dout)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  # With explicit slots (a cache) the reference path runs: ragged per-row visibility.
  slots = jnp.stack([jnp.arange(s), jnp.minimum(jnp.arange(s), 40)])
  got = attn.mla_attention(*args, scale=0.25, q_slots=slots, impl="xla")
  np.testing.assert_allclose(got, attn.mla_attention_reference(*args, scale=0.25, q_slots=slots),
                             rtol=1e-6, atol=1e-6)
