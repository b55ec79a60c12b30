"""RMSNorm, computed in float32 as the released implementations do."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.layers.linear import dtype_of, param


class RMSNorm(nn.Module):
  """y = weight * x / sqrt(mean(x^2) + eps), normalised in fp32 then cast back to the compute dtype
  before the weight multiply (the order HF and DeepSeek's code use)."""
  dim: int
  eps: float = 1e-6
  param_dtype: str = "float32"
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    w = param(self, "weight", nn.initializers.ones, (self.dim,), (self.axis_name,),
              dtype_of(self.param_dtype))
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return w.astype(dtype) * y.astype(dtype)
