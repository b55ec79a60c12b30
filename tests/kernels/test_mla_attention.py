"""flash_attention vs float64 NumPy and vs the jnp reference: forward, dq, dk, dv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import mla_attention as ma

# Blocks of 16 with S=37 leave a ragged last block; Dqk=48 is read as 32 + 16 column chunks.
BS = ma.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                   block_k_dq=16, num_warps=4, num_stages=1)
B, H, DQK, DV = 2, 3, 48, 32
FP32_TOL = 2e-5
BF16_TOL = 1e-2   # bf16 inputs and outputs; p and dS are rounded to bf16 before the second matmuls


def _numpy_attention(q, k, v, dout, causal, scale):
  """float64 forward and analytic backward: returns out, dq, dk, dv."""
  q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
  sq, sk = q.shape[1], k.shape[1]
  s = np.einsum("bshd,bthd->bhst", q, k) * scale
  if causal:
    keep = np.arange(sq)[:, None] + (sk - sq) >= np.arange(sk)[None, :]
    s = np.where(keep, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhst,bthd->bshd", p, v)
  do = np.transpose(dout, (0, 2, 1, 3))                      # b h s d
  dv = np.einsum("bhst,bhsd->bthd", p, do)
  dp = np.einsum("bhsd,bthd->bhst", do, v)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  dq = np.einsum("bhst,bthd->bshd", ds, k) * scale
  dk = np.einsum("bhst,bshd->bthd", ds, q) * scale
  return out, dq, dk, dv


def _inputs(sq, sk, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, sq, H, DQK)).astype(dtype)
  k = jax.random.normal(ks[1], (B, sk, H, DQK)).astype(dtype)
  v = jax.random.normal(ks[2], (B, sk, H, DV)).astype(dtype)
  dout = jax.random.normal(ks[3], (B, sq, H, DV)).astype(dtype)
  return q, k, v, dout


def _vjp(fn, q, k, v, dout):
  out, pull = jax.vjp(fn, q, k, v)
  return (out,) + pull(dout)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(37, 37), (21, 37)])
def test_fp32_against_numpy_and_reference(causal, sq, sk, assert_close):
  q, k, v, dout = _inputs(sq, sk, jnp.float32)
  scale = 0.3
  got = _vjp(lambda a, b, c: ma.flash_attention(a, b, c, causal=causal, sm_scale=scale,
                                                block_sizes=BS), q, k, v, dout)
  want = _numpy_attention(q, k, v, dout, causal, scale)
  with jax.default_matmul_precision("float32"):
    ref = _vjp(lambda a, b, c: ma.flash_attention_reference(a, b, c, causal=causal, sm_scale=scale),
               q, k, v, dout)
  for name, g, w, r in zip(("out", "dq", "dk", "dv"), got, want, ref):
    tag = f"flash fp32 causal={causal} sq={sq} sk={sk} {name}"
    assert_close(tag + " vs numpy64", g, w, FP32_TOL)
    assert_close(tag + " vs reference", g, r, FP32_TOL)


def test_grad_matches_reference_grad_default_scale(assert_close):
  """jax.grad of a nonlinear loss through the kernel equals jax.grad through the reference."""
  q, k, v, _ = _inputs(37, 37, jnp.float32, seed=3)
  loss = lambda f: lambda a, b, c: jnp.sum(jnp.tanh(f(a, b, c)) ** 2)
  got = jax.grad(loss(lambda a, b, c: ma.flash_attention(a, b, c, block_sizes=BS)), (0, 1, 2))(
      q, k, v)
  with jax.default_matmul_precision("float32"):
    want = jax.grad(loss(ma.flash_attention_reference), (0, 1, 2))(q, k, v)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(f"flash grad {name} vs reference grad", g, w, FP32_TOL)


def test_bf16_against_numpy(assert_close):
  q, k, v, dout = _inputs(37, 37, jnp.bfloat16, seed=1)
  got = _vjp(lambda a, b, c: ma.flash_attention(a, b, c, causal=True, block_sizes=BS),
             q, k, v, dout)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  want = _numpy_attention(q, k, v, dout, True, DQK ** -0.5)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(f"flash bf16 causal {name} vs numpy64", g, w, BF16_TOL)


def test_causality_through_gradients():
  """The loss at query 10 has zero gradient w.r.t. keys and values after position 10."""
  q, k, v, _ = _inputs(37, 37, jnp.float32, seed=2)
  f = lambda b, c: jnp.sum(ma.flash_attention(q, b, c, causal=True, block_sizes=BS)[:, 10])
  dk, dv = jax.grad(f, (0, 1))(k, v)
  assert float(jnp.abs(dk[:, 11:]).max()) == 0.0 and float(jnp.abs(dv[:, 11:]).max()) == 0.0
  assert float(jnp.abs(dv[:, :11]).min(axis=-1).max()) > 0.0
