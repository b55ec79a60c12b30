"""mla_decode vs float64 NumPy and vs the jnp reference, ragged lengths, Sq in {1, 3}, several splits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import mla_decode as md

B, H, T, DC, DR = 4, 4, 45, 32, 16
LENGTHS = np.array([T, 1, 17, 32], np.int32)   # full, a single row, ragged, a block multiple
SCALE = 0.2


def _numpy_decode(q_c, q_pe, c_kv, k_pe, lengths, scale):
  q_c, q_pe, c_kv, k_pe = (np.asarray(a, np.float64) for a in (q_c, q_pe, c_kv, k_pe))
  b, sq, h, dc = q_c.shape
  out = np.zeros((b, sq, h, dc))
  for bi in range(b):
    for i in range(sq):
      n = int(lengths[bi]) - sq + i + 1          # visible cache rows of query i
      if n <= 0:
        continue
      s = (q_c[bi, i] @ c_kv[bi, :n].T + q_pe[bi, i] @ k_pe[bi, :n].T) * scale   # [H, n]
      p = np.exp(s - s.max(-1, keepdims=True))
      out[bi, i] = (p / p.sum(-1, keepdims=True)) @ c_kv[bi, :n]
  return out


def _inputs(sq, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, sq, H, DC)).astype(dtype),
          jax.random.normal(ks[1], (B, sq, H, DR)).astype(dtype),
          jax.random.normal(ks[2], (B, T, DC)).astype(dtype),
          jax.random.normal(ks[3], (B, T, DR)).astype(dtype))


@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("splits", [1, 3])
def test_fp32_against_numpy_and_reference(sq, splits, assert_close):
  args = _inputs(sq, jnp.float32, seed=sq)
  bs = md.BlockSizes(block_rows=16, block_k=16, num_splits=splits, num_warps=4, num_stages=1)
  got = md.mla_decode(*args, jnp.asarray(LENGTHS), sm_scale=SCALE, block_sizes=bs)
  want = _numpy_decode(*args, LENGTHS, SCALE)
  with jax.default_matmul_precision("float32"):
    ref = md.mla_decode_reference(*args, jnp.asarray(LENGTHS), sm_scale=SCALE)
  assert_close(f"decode fp32 sq={sq} splits={splits} vs numpy64", got, want, 2e-6)
  assert_close(f"decode fp32 sq={sq} splits={splits} vs reference", got, ref, 2e-6)
  assert_close(f"decode reference sq={sq} vs numpy64", ref, want, 2e-6)


def test_bf16_default_blocks_against_numpy(assert_close):
  args = _inputs(3, jnp.bfloat16, seed=7)
  got = md.mla_decode(*args, jnp.asarray(LENGTHS), sm_scale=SCALE)
  assert got.dtype == jnp.bfloat16
  # bf16 inputs, p rounded to bf16 for the value matmul, bf16 output.
  assert_close("decode bf16 sq=3 default blocks vs numpy64", got, _numpy_decode(
      *args, LENGTHS, SCALE), 1e-2)


def test_cache_past_length_is_never_seen():
  """Garbage (NaN) past each row's length must not reach the output."""
  q_c, q_pe, c_kv, k_pe = _inputs(1, jnp.float32, seed=5)
  valid = jnp.arange(T)[None, :, None] < jnp.asarray(LENGTHS)[:, None, None]
  bs = md.BlockSizes(block_rows=16, block_k=16, num_splits=3)
  clean = md.mla_decode(q_c, q_pe, c_kv, k_pe, jnp.asarray(LENGTHS), sm_scale=SCALE, block_sizes=bs)
  dirty = md.mla_decode(q_c, q_pe, jnp.where(valid, c_kv, jnp.nan), jnp.where(valid, k_pe, jnp.nan),
                        jnp.asarray(LENGTHS), sm_scale=SCALE, block_sizes=bs)
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))
