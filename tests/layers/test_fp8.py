"""Fine-grained FP8 numerics against an independent NumPy float64 simulation of the DeepSeek-V3 recipe."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.ops import fp8

F8 = ml_dtypes.float8_e4m3fn
HALF_ULP = 2.0 ** -4           # E4M3: 3 mantissa bits, relative rounding error <= 2^-4 for normal values
SUB_STEP = 2.0 ** -9           # E4M3 subnormal spacing (in units of the tile scale)
ROUND = 1 + 2.0 ** -20         # slack for the fp32 divide / multiply around the fp8 rounding


# ---------------------------------------------------------------------------------------------------
# Independent reference: explicit loops over tiles / blocks, NumPy + ml_dtypes, float64 accumulation
# ---------------------------------------------------------------------------------------------------

def ref_scale(seg):
  amax = np.float32(np.max(np.abs(seg))) if seg.size else np.float32(0)
  return np.float32(1.0) if amax == 0 else np.float32(amax * np.float32(1.0 / 448.0))


def ref_encode(seg, s):
  return np.clip(seg.astype(np.float32) / s, -448, 448).astype(F8)


def ref_quant_rows(a, tile=128):
  """Per 1 x tile along the last axis of a 2-D array: (codes as float64 [R, L], scales float32 [R, T])."""
  a = np.asarray(a, np.float32)
  rows, length = a.shape
  nt = -(-length // tile)
  codes = np.zeros((rows, length), np.float64)
  scales = np.zeros((rows, nt), np.float32)
  for r in range(rows):
    for t in range(nt):
      seg = a[r, t * tile:(t + 1) * tile]
      scales[r, t] = ref_scale(seg)
      codes[r, t * tile:(t + 1) * tile] = ref_encode(seg, scales[r, t]).astype(np.float64)
  return codes, scales


def ref_quant_blocks(w, b0=128, b1=128):
  w = np.asarray(w, np.float32)
  r, c = w.shape
  nr, nc = -(-r // b0), -(-c // b1)
  codes = np.zeros((r, c), np.float64)
  scales = np.zeros((nr, nc), np.float32)
  for i in range(nr):
    for j in range(nc):
      blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
      scales[i, j] = ref_scale(blk)
      codes[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = ref_encode(blk, scales[i, j]).astype(np.float64)
  return codes, scales


def ref_gemm(qa, sa, qb, sb_of_chunk, tile=128):
  """sum over contraction chunks c of (qa[:, c] @ qb[c, :]) * sa[:, c, None] * sb_of_chunk(c)[None, :]."""
  length = qa.shape[1]
  out = np.zeros((qa.shape[0], qb.shape[1]), np.float64)
  for c in range(-(-length // tile)):
    sl = slice(c * tile, (c + 1) * tile)
    out += (qa[:, sl] @ qb[sl, :]) * sa[:, c, None].astype(np.float64) * sb_of_chunk(c)[None, :]
  return out


def ref_forward(x, w, tile=128):
  qx, sx = ref_quant_rows(x, tile)
  qw, sw = ref_quant_blocks(w, tile, tile)
  cols = np.arange(w.shape[1]) // tile
  return ref_gemm(qx, sx, qw, lambda c: sw[c, cols].astype(np.float64), tile)


def ref_dgrad(dy, w, tile=128):
  qd, sd = ref_quant_rows(dy, tile)              # 1 x 128 along N
  qw, sw = ref_quant_blocks(w, tile, tile)       # the forward's blocks, used transposed
  rows = np.arange(w.shape[0]) // tile
  return ref_gemm(qd, sd, qw.T, lambda c: sw[rows, c].astype(np.float64), tile)


def ref_wgrad(x, dy, tile=128):
  qxt, sxt = ref_quant_rows(x.T, tile)           # x per 128 x 1 along tokens
  qdt, sdt = ref_quant_rows(dy.T, tile)          # dy per 128 x 1 along tokens
  return ref_gemm(qxt, sxt, qdt.T, lambda c: sdt[:, c].astype(np.float64), tile)


def check_elementwise_bound(x, dq, scale_per_elem):
  """|x - dq| <= |x| 2^-4 where x / scale is E4M3-normal, else <= one half subnormal step of the scale."""
  x = np.asarray(x, np.float64)
  err = np.abs(x - np.asarray(dq, np.float64))
  s = np.asarray(scale_per_elem, np.float64)
  normal = np.abs(x) / s >= fp8.E4M3_MIN_NORMAL
  assert np.all(err[normal] <= np.abs(x[normal]) * HALF_ULP * ROUND), np.max(err[normal] / np.abs(x[normal]))
  assert np.all(err <= np.maximum(np.abs(x) * HALF_ULP, s * SUB_STEP / 2) * ROUND)
  return float(np.max(err[normal] / np.abs(x[normal])))


# ---------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------

def test_quantize_act_per_tile_scale_and_error_bound():
  rng = np.random.default_rng(0)
  # K = 200: tiles of 128 and a ragged 72; every (row, tile) gets its own magnitude from 1e-6 to 1e6.
  mags = 10.0 ** rng.integers(-6, 7, size=(6, 2))
  x = rng.standard_normal((6, 200)) * np.repeat(mags, 128, axis=1)[:, :200]
  x = x.astype(np.float32)
  q, s = fp8.quantize_act(jnp.asarray(x))
  q, s = np.asarray(q), np.asarray(s)
  rq, rs = ref_quant_rows(x)
  assert q.dtype == F8 and s.shape == (6, 2)
  np.testing.assert_array_equal(s, rs)
  np.testing.assert_array_equal(q.astype(np.float64), rq)
  # The largest element of each tile lands on E4M3's largest finite value.
  absq = np.abs(q.astype(np.float32))
  np.testing.assert_array_equal([absq[:, :128].max(1), absq[:, 128:].max(1)], np.full((2, 6), 448.0))
  dq = np.asarray(fp8.dequantize_act(jnp.asarray(q), jnp.asarray(s)))
  worst = check_elementwise_bound(x, dq, np.repeat(s, 128, axis=1)[:, :200])
  assert worst <= HALF_ULP * ROUND
  # One scale per row would flush the small tiles to zero: per-tile scaling keeps all of them.
  assert np.all(np.abs(dq[x != 0]) > 0)


def test_quantize_weight_per_block_scale_and_error_bound():
  rng = np.random.default_rng(1)
  mags = 10.0 ** rng.integers(-5, 6, size=(2, 2))
  w = rng.standard_normal((200, 130)) * np.kron(mags, np.ones((128, 128)))[:200, :130]
  w = w.astype(np.float32)
  q, s = fp8.quantize_weight(jnp.asarray(w))
  q, s = np.asarray(q), np.asarray(s)
  rq, rs = ref_quant_blocks(w)
  assert q.shape == (200, 130) and s.shape == (2, 2)
  np.testing.assert_array_equal(s, rs)
  np.testing.assert_array_equal(q.astype(np.float64), rq)
  dq = np.asarray(fp8.dequantize_weight(jnp.asarray(q), jnp.asarray(s)))
  check_elementwise_bound(w, dq, np.kron(s, np.ones((128, 128)))[:200, :130])


def test_zero_tiles_give_zero_and_nan_propagates():
  x = np.zeros((3, 200), np.float32)
  x[1, 130:] = np.linspace(-2, 3, 70)
  q, s = fp8.quantize_act(x)                      # NumPy path
  assert isinstance(q, np.ndarray) and not np.isnan(s).any()
  np.testing.assert_array_equal(s[0], [1.0, 1.0])
  dq = fp8.dequantize_act(q, s)
  assert not np.isnan(dq).any()
  np.testing.assert_array_equal(dq[0], 0.0)
  np.testing.assert_array_equal(dq[1, :128], 0.0)
  check_elementwise_bound(x[1, 130:], dq[1, 130:], s[1, 1])
  # Bad input must not turn into a finite, silently wrong result.
  x[2, 5] = np.nan
  q, s = fp8.quantize_act(x)
  assert np.isnan(fp8.dequantize_act(q, s)[2, :128]).all()


# ---------------------------------------------------------------------------------------------------
# Checkpoint blockwise layout
# ---------------------------------------------------------------------------------------------------

def test_blockwise_round_trip_numpy_and_jax_ragged():
  rng = np.random.default_rng(2)
  w = (rng.standard_normal((300, 200)) * 0.02).astype(np.float32)
  w[128:256, 128:] = 0.0                          # one all-zero block
  q, s = fp8.quantize_blockwise(w, (128, 128))
  assert isinstance(q, np.ndarray) and q.dtype == F8 and s.dtype == np.float32 and s.shape == (3, 2)
  rq, rs = ref_quant_blocks(w)
  np.testing.assert_array_equal(s, rs)
  np.testing.assert_array_equal(q.astype(np.float64), rq)
  dq = fp8.dequantize_blockwise(q, s, (128, 128), dtype=np.float32)
  assert isinstance(dq, np.ndarray) and dq.dtype == np.float32
  check_elementwise_bound(w, dq, np.kron(s, np.ones((128, 128)))[:300, :200])
  np.testing.assert_array_equal(dq[128:256, 128:], 0.0)
  # The jax path gives the same codes and scales, and dequantizes them identically.
  qj, sj = fp8.quantize_blockwise(jnp.asarray(w), (128, 128))
  assert isinstance(qj, jax.Array) and qj.dtype == F8
  np.testing.assert_array_equal(np.asarray(qj).view(np.uint8), q.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(sj), s)
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_blockwise(qj, sj, dtype=jnp.float32)), dq)
  # bf16 output (the importer's default) is the fp32 product rounded once.
  dq16 = fp8.dequantize_blockwise(q, s)
  assert dq16.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(dq16.astype(np.float32), dq.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_dequantize_blockwise_checkpoint_codes_and_errors():
  rng = np.random.default_rng(3)
  # A released-style tensor: arbitrary fp8 codes [out, in] and weight_scale_inv ceil(out/128) x ceil(in/128).
  codes = rng.uniform(-448, 448, size=(2, 300, 200)).astype(F8)
  scale_inv = rng.uniform(1e-5, 1e-3, size=(2, 3, 2)).astype(np.float32)
  out = fp8.dequantize_blockwise(codes, scale_inv, (128, 128), dtype=np.float32)
  i, j = np.meshgrid(np.arange(300) // 128, np.arange(200) // 128, indexing="ij")
  want = codes.astype(np.float32) * scale_inv[:, i, j]
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError, match="weight_scale_inv"):
    fp8.dequantize_blockwise(codes, scale_inv[:, :2], (128, 128))
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    fp8.dequantize_blockwise(codes.astype(np.float32), scale_inv, (128, 128))


# ---------------------------------------------------------------------------------------------------
# fp8_matmul: forward and both backward GEMMs
# ---------------------------------------------------------------------------------------------------

def _problem(seed=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, 50, 200)).astype(np.float32)        # 150 tokens: two ragged token chunks
  w = (rng.standard_normal((200, 130)) / np.sqrt(200)).astype(np.float32)
  dy = rng.standard_normal((3, 50, 130)).astype(np.float32)
  return x, w, dy


def _rel_max(a, ref):
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("simulate,chunks_per_step", [(True, None), (False, 1)])
def test_fp8_matmul_matches_recipe_simulation(simulate, chunks_per_step):
  """simulate=False runs the FP8 dot_general code path (upcast by XLA on CPU); chunks_per_step=1 the scan."""
  x, w, dy = _problem()

  @jax.jit
  def fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, simulate=simulate, chunks_per_step=chunks_per_step),
                     x, w)
    return (y,) + vjp(dy)

  y, dx, dw = fwd_bwd(x, w, dy)
  assert y.shape == (3, 50, 130) and dx.dtype == x.dtype and dw.dtype == w.dtype
  x2, dy2 = x.reshape(150, 200), dy.reshape(150, 130)
  err_y = _rel_max(np.asarray(y).reshape(150, 130), ref_forward(x2, w))
  err_dx = _rel_max(np.asarray(dx).reshape(150, 200), ref_dgrad(dy2, w))
  err_dw = _rel_max(dw, ref_wgrad(x2, dy2))
  # Same codes and scales as the reference; only the fp32 accumulation differs from float64.
  assert max(err_y, err_dx, err_dw) < 5e-7, (err_y, err_dx, err_dw)

  # Against exact fp32 GEMMs: E4M3 rounds each operand with relative RMS error about 0.0245 (half-ulp
  # 2^-4 / m, m the mantissa), so a product of two quantized operands is off by about sqrt(2) * 0.0245 =
  # 0.035 in relative Frobenius norm on normal data; unquantized math would be ~1e-7.
  def rel_fro(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
  for got, exact in [(np.asarray(y).reshape(150, 130), x2.astype(np.float64) @ w),
                     (np.asarray(dx).reshape(150, 200), dy2.astype(np.float64) @ w.T),
                     (dw, x2.T.astype(np.float64) @ dy2)]:
    assert 0.02 < rel_fro(got, exact) < 0.05


def test_fp8_matmul_zero_inputs_and_dtypes():
  x = np.zeros((2, 130), np.float32)
  x[1, :3] = [1.0, -2.0, 0.5]                     # tile (1, 0) non-zero, all others zero
  w = np.zeros((130, 10), np.float32)
  w[:3, 0] = [4.0, 1.0, 2.0]                      # E4M3-exact values: only the scales' fp32 rounding remains

  def loss(x, w):
    return jnp.sum(fp8.fp8_matmul(x, w, out_dtype=jnp.float32) ** 2)

  y = fp8.fp8_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  assert y.dtype == jnp.bfloat16
  # atol=0: every entry fed only by zero tiles must come out exactly zero.
  np.testing.assert_allclose(np.asarray(y, np.float32), x @ w, rtol=1e-6, atol=0)
  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(dw)).all()
  np.testing.assert_allclose(np.asarray(dx), 2 * (x @ w) @ w.T, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(dw), 2 * x.T @ (x @ w), rtol=1e-6, atol=0)


def test_fp8_matmul_rejects_bad_arguments():
  x, w = jnp.zeros((4, 200)), jnp.zeros((200, 130))
  with pytest.raises(ValueError, match="disagree on K"):
    fp8.fp8_matmul(x, w.T)
  with pytest.raises(ValueError, match="multiples of tile"):
    fp8.fp8_matmul(x, w, block=(64, 128))
