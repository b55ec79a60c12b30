"""Fine-grained FP8 (E4M3) numerics of DeepSeek-V3 (report section 3.3).

The recipe:
  1. Activations are scaled per 1x128 tile along the contraction axis, weights per 128x128 block, each scale
     taken online from the tile's max-abs value (scale = amax / 448, so the largest element maps to E4M3's
     largest finite value).  Fine tiles keep one outlier from crushing the resolution of its whole row.
  2. A GEMM runs chunk by chunk along the contraction axis, 128 elements at a time: each chunk's partial
     product is computed on FP8 operands, promoted to FP32, multiplied by its activation and weight scales
     and added to an FP32 accumulator ("promotion every 128 elements").  Hopper tensor cores accumulate FP8
     products with only about 14 bits, which is why the report promotes at this interval.
  3. The backward GEMMs use the same scheme with the operand layouts of the report: dgrad (dx = dy @ w^T)
     quantizes dy per 1x128 tile along its contraction axis N and reuses the 128x128 weight blocks
     (transposed); wgrad (dw = x^T @ dy) quantizes x and dy per 128x1 tiles along the token axis.

Besides `fp8_matmul`, the file has the blockwise helpers of the released FP8 checkpoint layout (weights
[out, in] float8_e4m3fn with `weight_scale_inv` of shape ceil(out/128) x ceil(in/128), dequantize =
block x scale_inv), which work on NumPy arrays (the checkpoint importer streams through NumPy) and jax arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from deepseek_jax.ops import per_shard

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)  # jnp.float8_e4m3fn names the same dtype
E4M3_MAX = 448.0                     # largest finite E4M3 value (e4m3fn: no infinities)
E4M3_MIN_NORMAL = 2.0 ** -6          # below this E4M3 is subnormal (absolute step 2^-9)
E4M3_EPS = 2.0 ** -3                 # ulp of 1.0: 3 mantissa bits

# Auto grouping of chunks in `fp8_matmul`: at most this many fp32 partial-product elements are live at once.
_PARTIAL_BUDGET = 1 << 26


# ------------------------------------------------------------------------------------------------------
# Tile scales (shared by the jax and NumPy paths through the `xp` module argument)
# ------------------------------------------------------------------------------------------------------

def _xp(a):
  return np if isinstance(a, (np.ndarray, np.generic)) else jnp


def _scale_from_amax(xp, amax):
  """amax / 448 in fp32; an all-zero tile gets scale 1 (its codes are 0 anyway) instead of 0/0.

  NaN or inf amax is passed through so that bad inputs surface as NaN, never as silently finite output.
  """
  amax = amax.astype(np.float32)
  # A multiply by the rounded reciprocal, not a divide: compilers turn division by a constant into exactly this,
  # so writing it out keeps the NumPy and every XLA backend bit-identical.
  scale = amax * np.float32(1.0 / E4M3_MAX)
  return xp.where(amax == 0, np.float32(1.0), scale).astype(np.float32)


def _to_e4m3(xp, y):
  # Clip first: E4M3 has no infinity and values past 464 would round to NaN; amax / (amax / 448) can land an
  # fp32 rounding above 448.
  y = xp.clip(y, -E4M3_MAX, E4M3_MAX)
  return y.astype(E4M3)


def _pad_axis(xp, a, axis, multiple):
  size = a.shape[axis]
  pad = -size % multiple
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return xp.pad(a, widths)


def _check_fp8(name, a):
  if a.dtype != E4M3:
    raise ValueError(f"{name} has dtype {a.dtype}, expected float8_e4m3fn")


# ------------------------------------------------------------------------------------------------------
# Activations: 1 x tile along the last axis
# ------------------------------------------------------------------------------------------------------

def quantize_act(x, tile: int = 128):
  """Quantizes activations to E4M3 per 1 x `tile` tile along the last (contraction) axis.

  Args:
    x: float array [..., K]; K need not be a multiple of `tile` (the last tile is ragged).
    tile: tile length along the last axis.

  Returns:
    (x_fp8, scale): x_fp8 float8_e4m3fn [..., K] and scale float32 [..., ceil(K / tile)], such that
    x ~= x_fp8 * scale (the scale repeated over its tile), scale = max|tile| / 448 (as max|tile| * fp32(1/448)).
  """
  xp = _xp(x)
  if tile <= 0:
    raise ValueError(f"tile={tile} must be positive")
  k = x.shape[-1]
  xf = _pad_axis(xp, x.astype(np.float32), -1, tile)
  xt = xf.reshape(xf.shape[:-1] + (xf.shape[-1] // tile, tile))
  scale = _scale_from_amax(xp, xp.max(xp.abs(xt), axis=-1))
  q = _to_e4m3(xp, xt / scale[..., None])
  return q.reshape(xf.shape)[..., :k], scale


def dequantize_act(x_fp8, scale, tile: int = 128, dtype=jnp.float32):
  """Inverse of `quantize_act`: x_fp8 [..., K] times its per-tile scale [..., ceil(K / tile)].

  Args:
    x_fp8: float8_e4m3fn [..., K].
    scale: float32 [..., ceil(K / tile)].
    tile: tile length along the last axis.
    dtype: output dtype.

  Returns:
    [..., K] array of `dtype`.
  """
  xp = _xp(x_fp8)
  _check_fp8("x_fp8", x_fp8)
  k = x_fp8.shape[-1]
  want = x_fp8.shape[:-1] + (-(-k // tile),)
  if tuple(scale.shape) != want:
    raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {want} for x_fp8 {tuple(x_fp8.shape)} "
                     f"and tile={tile}")
  xf = _pad_axis(xp, x_fp8.astype(np.float32), -1, tile)
  xt = xf.reshape(xf.shape[:-1] + (xf.shape[-1] // tile, tile)) * scale[..., None].astype(np.float32)
  return xt.reshape(xf.shape)[..., :k].astype(dtype)


# ------------------------------------------------------------------------------------------------------
# Blocks over the last two axes: weights [K, N] for training, and the checkpoint layout [out, in]
# ------------------------------------------------------------------------------------------------------

def _block_shape(shape, block):
  return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def _blocked(xp, a, block):
  """Pads the last two axes to block multiples and views them as [..., R, b0, C, b1]."""
  b0, b1 = block
  a = _pad_axis(xp, _pad_axis(xp, a, -2, b0), -1, b1)
  r, c = a.shape[-2] // b0, a.shape[-1] // b1
  return a.reshape(a.shape[:-2] + (r, b0, c, b1))


def _check_block(block):
  block = tuple(int(b) for b in block)
  if len(block) != 2 or min(block) <= 0:
    raise ValueError(f"block={block} must be two positive ints")
  return block


def quantize_blockwise(w, block_size: Sequence[int] = (128, 128)):
  """Quantizes the last two axes of `w` to E4M3 per block (the released FP8 checkpoint layout).

  Works on NumPy arrays (returns NumPy, fp8 via ml_dtypes) and on jax arrays (returns jax arrays).

  Args:
    w: float array [..., R, C] (a checkpoint weight is [out, in]); edges need not be block multiples.
    block_size: (b0, b1) block shape.

  Returns:
    (w_fp8, scale_inv): w_fp8 float8_e4m3fn [..., R, C] and scale_inv float32
    [..., ceil(R / b0), ceil(C / b1)] with w ~= w_fp8 * scale_inv per block, scale_inv = max|block| / 448.
  """
  xp = _xp(w)
  block = _check_block(block_size)
  if w.ndim < 2:
    raise ValueError(f"quantize_blockwise needs at least 2 dims, got shape {tuple(w.shape)}")
  r, c = w.shape[-2:]
  wb = _blocked(xp, w.astype(np.float32), block)
  scale = _scale_from_amax(xp, xp.max(xp.abs(wb), axis=(-3, -1)))
  q = _to_e4m3(xp, wb / scale[..., :, None, :, None])
  q = q.reshape(q.shape[:-4] + (q.shape[-4] * block[0], q.shape[-2] * block[1]))
  return q[..., :r, :c], scale


def dequantize_blockwise(w_fp8, scale_inv, block_size: Sequence[int] = (128, 128), dtype=jnp.bfloat16):
  """Dequantizes a blockwise E4M3 tensor: each block times its `weight_scale_inv` entry, in fp32.

  Works on NumPy arrays (returns NumPy) and on jax arrays (returns jax arrays).

  Args:
    w_fp8: float8_e4m3fn [..., R, C] (a checkpoint weight is [out, in]).
    scale_inv: float [..., ceil(R / b0), ceil(C / b1)].
    block_size: (b0, b1) block shape.
    dtype: output dtype (NumPy: any NumPy or ml_dtypes dtype, e.g. ml_dtypes.bfloat16 == jnp.bfloat16).

  Returns:
    [..., R, C] array of `dtype`.
  """
  xp = _xp(w_fp8)
  block = _check_block(block_size)
  _check_fp8("w_fp8", w_fp8)
  if w_fp8.ndim < 2:
    raise ValueError(f"dequantize_blockwise needs at least 2 dims, got shape {tuple(w_fp8.shape)}")
  want = _block_shape(w_fp8.shape, block)
  if tuple(scale_inv.shape) != want:
    raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for weight "
                     f"{tuple(w_fp8.shape)} with block_size={block}")
  r, c = w_fp8.shape[-2:]
  wb = _blocked(xp, w_fp8.astype(np.float32), block)
  wb = wb * scale_inv.astype(np.float32)[..., :, None, :, None]
  wb = wb.reshape(wb.shape[:-4] + (wb.shape[-4] * block[0], wb.shape[-2] * block[1]))
  return wb[..., :r, :c].astype(dtype)


def quantize_weight(w, block: Sequence[int] = (128, 128)):
  """Quantizes a 2-D weight [K, N] to E4M3 per `block` (default 128x128), ragged edge blocks allowed.

  Args:
    w: float [K, N].
    block: (bK, bN) block shape.

  Returns:
    (w_fp8, scale): float8_e4m3fn [K, N] and float32 [ceil(K / bK), ceil(N / bN)], scale = max|block| / 448.
  """
  if w.ndim != 2:
    raise ValueError(f"quantize_weight expects a 2-D [K, N] weight, got shape {tuple(w.shape)}")
  return quantize_blockwise(jnp.asarray(w), block)


def dequantize_weight(w_fp8, scale, block: Sequence[int] = (128, 128), dtype=jnp.float32):
  """Inverse of `quantize_weight`.

  Args:
    w_fp8: float8_e4m3fn [K, N].
    scale: float32 [ceil(K / bK), ceil(N / bN)].
    block: (bK, bN) block shape.
    dtype: output dtype.

  Returns:
    [K, N] array of `dtype`.
  """
  return dequantize_blockwise(jnp.asarray(w_fp8), jnp.asarray(scale), block, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# The chunked, scaled FP8 GEMM
# ------------------------------------------------------------------------------------------------------

def native_fp8_available() -> bool:
  """True where the default backend has FP8 tensor cores (NVIDIA compute capability >= 8.9), and while
  tracing for a GPU target from another backend (`kernels._common.target_backend('gpu')`: an H100)."""
  from kernels._common import backend  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return backend() == "gpu"
  cc = getattr(dev, "compute_capability", None)
  try:
    return cc is not None and tuple(int(v) for v in str(cc).split(".")[:2]) >= (8, 9)
  except ValueError:
    return False


def _scaled_chunked_dot(aq, sa, bq, sb, *, chunk, simulate, chunks_per_step):
  """sum_c (aq[:, c] @ bq[c]) * sa[:, c] * sb[c] over contraction chunks c, accumulated in fp32.

  Args:
    aq: float8_e4m3fn [M, L] with L = C * chunk (zero padded).
    sa: float32 [M, C], the scale of each row's chunk.
    bq: float8_e4m3fn [L, N].
    sb: float32 [C, N], the scale of each column's chunk.
    chunk: contraction chunk length (the promotion interval).
    simulate: upcast the FP8 codes to fp32 before each chunk dot instead of running an FP8 dot.
    chunks_per_step: chunks batched into one dot_general; None picks the most that fit `_PARTIAL_BUDGET`.

  Returns:
    float32 [M, N].
  """
  m, length = aq.shape
  n = bq.shape[1]
  c = length // chunk
  g = chunks_per_step or max(1, _PARTIAL_BUDGET // max(1, m * n))
  g = min(g, c)
  steps = -(-c // g)
  # Padded chunks carry zero codes and zero scales: they add exactly zero.
  cp = steps * g
  aq = _pad_axis(jnp, aq, 1, cp * chunk)
  bq = _pad_axis(jnp, bq, 0, cp * chunk)
  sa = _pad_axis(jnp, sa, 1, cp)
  sb = _pad_axis(jnp, sb, 0, cp)
  a = aq.reshape(m, steps, g, chunk).transpose(1, 2, 0, 3)        # [steps, g, M, chunk]
  b = bq.reshape(steps, g, chunk, n)                               # [steps, g, chunk, N]
  sa = sa.reshape(m, steps, g).transpose(1, 2, 0)[..., None]       # [steps, g, M, 1]
  sb = sb.reshape(steps, g, 1, n)                                  # [steps, g, 1, N]

  def step(acc, xs):
    a_i, b_i, sa_i, sb_i = xs
    if simulate:
      # The fp32 values are exactly the E4M3 codes, so this is the FP8 product with an fp32 accumulator.
      a_i, b_i = a_i.astype(jnp.float32), b_i.astype(jnp.float32)
      precision = lax.Precision.HIGHEST
    else:
      precision = None
    p = lax.dot_general(a_i, b_i, (((2,), (1,)), ((0,), (0,))), precision=precision,
                        preferred_element_type=jnp.float32)         # [g, M, N]
    return acc + jnp.sum(p * sa_i * sb_i, axis=0), None

  acc = jnp.zeros((m, n), jnp.float32)
  if steps == 1:
    return step(acc, (a[0], b[0], sa[0], sb[0]))[0]
  return lax.scan(step, acc, (a, b, sa, sb))[0]


def _chunk_scales(scale_blocks, block_len, chunk, n_chunks):
  """Maps per-block scales [nB, ...] along the contraction to per-chunk scales [n_chunks, ...]."""
  idx = (np.arange(n_chunks) * chunk) // block_len
  return jnp.take(scale_blocks, jnp.asarray(idx), axis=0)


def _expand_cols(scale, block_len, n):
  """Repeats per-block column scales [..., nB] to per-column [..., n]."""
  return jnp.take(scale, jnp.asarray(np.arange(n) // block_len), axis=-1)


def _tile_quant_padded(a, tile):
  """quantize_act with the last axis padded to a tile multiple: codes [M, C*tile], scales [M, C]."""
  q, s = quantize_act(a, tile)
  return _pad_axis(jnp, q, -1, tile), s


def _fwd_gemm(x, w, tile, block, simulate, chunks_per_step):
  """y = x @ w with x per 1 x tile along K and w per block, fp32 [M, N]."""
  wq, sw = quantize_weight(w, block)                                 # [K, N], [nBK, nBN]
  return _fwd_gemm_codes(x, wq, sw, tile, block, simulate, chunks_per_step)


def _fwd_gemm_codes(x, wq, sw, tile, block, simulate, chunks_per_step):
  """y = x @ (wq * sw per block) with x quantized per 1 x tile along K, fp32 [M, N]."""
  n = wq.shape[1]
  xq, sx = _tile_quant_padded(x, tile)                               # [M, Ck*tile], [M, Ck]
  ck = sx.shape[1]
  wq = _pad_axis(jnp, wq, 0, tile)
  sb = _expand_cols(_chunk_scales(sw, block[0], tile, ck), block[1], n)   # [Ck, N]
  return _scaled_chunked_dot(xq, sx, wq, sb, chunk=tile, simulate=simulate, chunks_per_step=chunks_per_step)


def _dgrad_gemm(dy, w, tile, block, simulate, chunks_per_step):
  """dx = dy @ w^T with dy per 1 x tile along N and w's blocks transposed, fp32 [M, K]."""
  k, n = w.shape
  dq, sd = _tile_quant_padded(dy, tile)                              # [M, Cn*tile], [M, Cn]
  wq, sw = quantize_weight(w, block)
  cn = sd.shape[1]
  wtq = _pad_axis(jnp, wq.T, 0, tile)                                # [Cn*tile, K]
  sb = _expand_cols(_chunk_scales(sw.T, block[1], tile, cn), block[0], k)  # [Cn, K]
  return _scaled_chunked_dot(dq, sd, wtq, sb, chunk=tile, simulate=simulate, chunks_per_step=chunks_per_step)


def _wgrad_gemm(x, dy, tile, simulate, chunks_per_step):
  """dw = x^T @ dy with x and dy per tile x 1 along the token axis M, fp32 [K, N]."""
  xtq, sxt = _tile_quant_padded(x.T, tile)                           # [K, Cm*tile], [K, Cm]
  dtq, sdt = _tile_quant_padded(dy.T, tile)                          # [N, Cm*tile], [N, Cm]
  return _scaled_chunked_dot(xtq, sxt, dtq.T, sdt.T, chunk=tile, simulate=simulate,
                             chunks_per_step=chunks_per_step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_matmul_2d(x, w, tile, block, out_dtype, simulate, chunks_per_step):
  return _fwd_gemm(x, w, tile, block, simulate, chunks_per_step).astype(out_dtype)


def _fp8_matmul_2d_fwd(x, w, tile, block, out_dtype, simulate, chunks_per_step):
  # Residuals are the unquantized operands (w is alive anyway as a parameter); the backward requantizes them
  # in the layouts its GEMMs need, which for x (128x1 tiles) differ from the forward's.
  y = _fwd_gemm(x, w, tile, block, simulate, chunks_per_step).astype(out_dtype)
  return y, (x, w)


def _fp8_matmul_2d_bwd(tile, block, out_dtype, simulate, chunks_per_step, res, dy):
  x, w = res
  dx = _dgrad_gemm(dy, w, tile, block, simulate, chunks_per_step).astype(x.dtype)
  dw = per_shard.summed_over_tokens(
      lambda x, dy: _wgrad_gemm(x, dy, tile, simulate, chunks_per_step), x, dy).astype(w.dtype)
  return dx, dw


_fp8_matmul_2d.defvjp(_fp8_matmul_2d_fwd, _fp8_matmul_2d_bwd)
# Jitted so that eager calls run as one computation; inside an outer jit this is inlined.
_fp8_matmul_2d_jit = jax.jit(_fp8_matmul_2d, static_argnums=(2, 3, 4, 5, 6))


def _check_tiles(name: str, tile: int, block) -> None:
  """Each weight block must hold whole activation tiles (one weight scale per 128-chunk of K)."""
  if tile <= 0 or block[0] % tile or block[1] % tile:
    raise ValueError(f"{name}: block={block} must be multiples of tile={tile}")


def fp8_matmul(x, w, *, tile: int = 128, block: Tuple[int, int] = (128, 128), out_dtype=None,
               simulate: Optional[bool] = None, chunks_per_step: Optional[int] = None):
  """x @ w with DeepSeek-V3's fine-grained FP8 recipe, differentiable (custom VJP).

  Forward: x is quantized to E4M3 per 1 x `tile` tile along K, w per `block`; the product runs in chunks of
  `tile` along K, each chunk's FP8 partial product promoted to fp32, scaled by its two scales and accumulated
  in fp32.  Backward: dgrad dx = dy @ w^T quantizes dy per 1 x `tile` along N and uses w's blocks transposed;
  wgrad dw = x^T @ dy quantizes x and dy per `tile` x 1 along the (flattened) token axis.  Both use the same
  chunked, promoted accumulation.

  Why per chunk, also on GPU: the activation scale changes every `tile` elements of K and the weight scale
  every block, so no scale can be pulled out of a whole-K FP8 dot exactly, and XLA's FP8 GEMM (cuBLASLt)
  takes only per-tensor scales.  Each chunk is therefore its own `dot_general` on float8_e4m3fn operands with
  `preferred_element_type=float32` (the tensor core's accumulation spans only `tile` products, as the report
  prescribes), batched over `chunks_per_step` chunks, with scaling and accumulation in fp32 outside the
  tensor core.  With `simulate=True` the E4M3 codes are upcast to fp32 before each chunk dot (exact products,
  fp32 accumulation): the quantize-dequantize simulation used on CPU and other backends without FP8 dots.

  Args:
    x: float [..., K]; leading dims are flattened into tokens.
    w: float [K, N].
    tile: activation tile length and contraction chunk length (the promotion interval).
    block: weight block (bK, bN); both must be multiples of `tile` so each chunk sees one weight scale.
    out_dtype: result dtype; None means x.dtype.
    simulate: None picks the real FP8 dot where the backend has FP8 tensor cores (`native_fp8_available`),
      the simulation otherwise.
    chunks_per_step: contraction chunks per batched dot; None fits the fp32 partial products of one step into
      `_PARTIAL_BUDGET` elements (one step when they fit, else a `lax.scan` over steps).

  Returns:
    [..., N] array of `out_dtype`.
  """
  block = _check_block(block)
  if w.ndim != 2:
    raise ValueError(f"fp8_matmul: w must be 2-D [K, N], got shape {tuple(w.shape)}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"fp8_matmul: x {tuple(x.shape)} and w {tuple(w.shape)} disagree on K")
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(w.dtype, jnp.floating)):
    raise ValueError(f"fp8_matmul: x ({x.dtype}) and w ({w.dtype}) must be floating point")
  _check_tiles("fp8_matmul", tile, block)
  if chunks_per_step is not None and chunks_per_step <= 0:
    raise ValueError(f"fp8_matmul: chunks_per_step={chunks_per_step} must be positive")
  if simulate is None:
    simulate = not native_fp8_available()
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), x.shape[-1])
  y = _fp8_matmul_2d_jit(x2, w, int(tile), block, out_dtype, bool(simulate), chunks_per_step)
  return y.reshape(lead + (w.shape[1],))


def fp8_matmul_quantized(x, w_fp8, scale_inv, *, tile: int = 128, block: Tuple[int, int] = (128, 128),
                         out_dtype=None, simulate: Optional[bool] = None,
                         chunks_per_step: Optional[int] = None):
  """x @ W for a weight already stored as E4M3 codes + per-block scales (FP8 inference, forward only).

  The forward of `fp8_matmul` with the stored codes as the weight operand (no requantization): x is
  quantized per 1 x `tile` tile along K, each chunk's FP8 product is promoted to fp32 and scaled.  On FP8
  tensor cores (`native_fp8_available`) the chunk dots run on float8_e4m3fn operands; elsewhere they are
  simulated exactly in fp32.

  Args:
    x: float [..., K].
    w_fp8: float8_e4m3fn [K, N].
    scale_inv: float32 [ceil(K / bK), ceil(N / bN)], W = w_fp8 * scale_inv per block.
    tile: activation tile and contraction chunk length.
    block: (bK, bN) of `scale_inv`; multiples of `tile`.
    out_dtype: result dtype; None means x.dtype.
    simulate: as in `fp8_matmul`.
    chunks_per_step: as in `fp8_matmul`.

  Returns:
    [..., N] array of `out_dtype`.
  """
  block = _check_block(block)
  _check_fp8("w_fp8", w_fp8)
  if w_fp8.ndim != 2 or x.ndim < 1 or x.shape[-1] != w_fp8.shape[0]:
    raise ValueError(f"fp8_matmul_quantized: x {tuple(x.shape)} and w_fp8 {tuple(w_fp8.shape)} must be "
                     "[..., K] and [K, N]")
  want = _block_shape(w_fp8.shape, block)
  if tuple(scale_inv.shape) != want:
    raise ValueError(f"fp8_matmul_quantized: scale_inv has shape {tuple(scale_inv.shape)}, expected {want} "
                     f"for w_fp8 {tuple(w_fp8.shape)} with block={block}")
  _check_tiles("fp8_matmul_quantized", tile, block)
  if simulate is None:
    simulate = not native_fp8_available()
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), x.shape[-1])
  y = _fwd_gemm_codes(x2, w_fp8, scale_inv.astype(jnp.float32), int(tile), block, bool(simulate),
                      chunks_per_step)
  return y.astype(out_dtype).reshape(lead + (w_fp8.shape[1],))


# ------------------------------------------------------------------------------------------------------
# Quantize-dequantize ("fake quantization") for GEMMs computed outside `fp8_matmul` (the routed experts)
# ------------------------------------------------------------------------------------------------------

def _qdq_act(x, tile):
  q, s = quantize_act(x, tile)
  return dequantize_act(q, s, tile, dtype=x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant_act(x, tile: int = 128):
  """x rounded to E4M3 per 1 x `tile` tile along the last axis (forward); the cotangent passes unchanged.

  Placed on a GEMM's activation operand, the forward sees exactly the values `fp8_matmul` multiplies.

  Args:
    x: float [..., K].
    tile: tile length along the last axis.

  Returns:
    [..., K] of x's dtype: dequantize(quantize(x)).
  """
  return _qdq_act(x, tile)


fake_quant_act.defvjp(lambda x, tile: (_qdq_act(x, tile), None), lambda tile, _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant_grad(y, tile: int = 128):
  """The identity forward; the cotangent is rounded to E4M3 per 1 x `tile` tile along the last axis.

  Placed on a GEMM's output, the dgrad GEMM sees the cotangent quantized as in `fp8_matmul`'s backward.

  Args:
    y: float [..., N].
    tile: tile length along the last axis.

  Returns:
    y unchanged.
  """
  return y


fake_quant_grad.defvjp(lambda y, tile: (y, None), lambda tile, _, g: (_qdq_act(g, tile),))


def _qdq_blocks(w, block):
  q, s = quantize_blockwise(w, block)
  return dequantize_blockwise(q, s, block, dtype=w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant_blockwise(w, block: Tuple[int, int] = (128, 128)):
  """w rounded to E4M3 per `block` of its last two axes (forward); the cotangent passes unchanged.

  Args:
    w: float [..., K, N] (e.g. a stack of expert weights [E, K, N]: one set of blocks per expert).
    block: (bK, bN).

  Returns:
    [..., K, N] of w's dtype: dequantize_blockwise(quantize_blockwise(w)).
  """
  return _qdq_blocks(w, block)


fake_quant_blockwise.defvjp(lambda w, block: (_qdq_blocks(w, block), None), lambda block, _, g: (g,))


__all__ = [
    "E4M3", "E4M3_MAX", "E4M3_MIN_NORMAL", "E4M3_EPS",
    "quantize_act", "dequantize_act", "quantize_weight", "dequantize_weight",
    "quantize_blockwise", "dequantize_blockwise", "native_fp8_available", "fp8_matmul",
    "fp8_matmul_quantized", "fake_quant_act", "fake_quant_grad", "fake_quant_blockwise",
]
