"""Rotary position embedding with YaRN, in the interleaved (complex-pair) layout of DeepSeek's weights.

YaRN (arXiv 2309.00071) as DeepSeek-V2/V3 use it:
1. Frequencies: inv_freq_i = base^(-2i/d).  Dimensions whose wavelength fits `beta_fast` rotations in the
   original window keep their frequency (extrapolation), those with fewer than `beta_slow` rotations are
   divided by `factor` (interpolation), with a linear ramp between the two correction dims.
2. cos/sin are multiplied by the attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim).
3. The softmax scale gets m^2 with m = 0.1 * mscale_all_dim * ln(factor) + 1 (`ModelConfig.softmax_scale`).
The released weights rotate consecutive pairs (x0, x1), (x2, x3), ... by one frequency each.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, RopeScaling, yarn_get_mscale


def yarn_correction_range(dim: int, base: float, rs: RopeScaling) -> tuple[int, int]:
  """The (low, high) dims between which YaRN ramps from extrapolation to interpolation."""
  def correction_dim(num_rotations):
    return (dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(base)))
  low = math.floor(correction_dim(rs.beta_fast))
  high = math.ceil(correction_dim(rs.beta_slow))
  return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [Dr/2] (float32) and the attention factor multiplying cos/sin."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32), 1.0
  low, high = yarn_correction_range(dim, base, rs)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1.0 - ramp
  inv_freq = inv_freq / rs.factor * (1 - extrapolation) + inv_freq * extrapolation
  if rs.mscale and rs.mscale_all_dim:
    attention_factor = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor,
                                                                                  rs.mscale_all_dim)
  else:
    attention_factor = yarn_get_mscale(rs.factor)
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions):
  """cos, sin of shape positions.shape + [Dr/2], float32, with the attention factor folded in."""
  inv_freq, factor = rope_frequencies(cfg)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x, cos, sin):
  """Rotates consecutive pairs of the last dim of x [B, S, ..., Dr] by the angles of cos/sin [B, S, Dr/2]."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  extra = x.ndim - 1 - cos.ndim  # head dims between S and the pair dim
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(out.shape[:-2] + (-1,)).astype(dtype)
