"""Linear projections and parameter helpers shared by every layer.

Every parameter is created through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`) so that `deepseek_jax.sharding` can map it onto a mesh.  Kernels are stored
in the [in..., out...] layout; the HF checkpoint layout [out, in] is a transpose in `deepseek_jax.interop`.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


def dtype_of(name: str):
  """The jnp dtype for a config dtype string."""
  return jnp.dtype(name)


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str], dtype):
  """Creates a parameter with logical axis names `axes` (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"parameter {name}: {len(axes)} axis names for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class Linear(nn.Module):
  """y = x @ W over the trailing `len(in_axes)` dims of x, W of shape in_shape + out_shape.

  With `cfg.precision == 'fp8'` and `fp8=True` the product goes through the blockwise-scaled E4M3 GEMM of
  `deepseek_jax.layers.fp8` (report section 3.3); layers the report keeps in higher precision pass
  `fp8=False`.
  """
  cfg: ModelConfig
  in_shape: tuple
  out_shape: tuple
  axes: tuple  # logical names, len(in_shape) + len(out_shape)
  fp8: bool = True
  std: float | None = None

  def setup(self):
    std = self.cfg.initializer_range if self.std is None else self.std
    self.w = param(self, "kernel", normal_init(std), tuple(self.in_shape) + tuple(self.out_shape),
                   self.axes, dtype_of(self.cfg.param_dtype))

  def kernel(self):
    """The kernel in its storage dtype ([in..., out...])."""
    return self.w

  def __call__(self, x):
    w = self.kernel()
    dtype = dtype_of(self.cfg.dtype)
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != tuple(self.in_shape):
      raise ValueError(f"{self.name}: input trailing shape {x.shape[x.ndim - n_in:]} != "
                       f"{tuple(self.in_shape)}")
    if self.fp8 and self.cfg.precision == "fp8":
      from deepseek_jax.layers import fp8  # pylint: disable=g-import-not-at-top
      lead = x.shape[:x.ndim - n_in]
      k = math.prod(self.in_shape)
      y = fp8.fp8_matmul(x.reshape(-1, k).astype(dtype), w.reshape(k, -1).astype(dtype),
                         out_dtype=dtype)
      return y.reshape(lead + tuple(self.out_shape))
    return contract(x.astype(dtype), w.astype(dtype), n_in)


def contract(x, w, n_in: int):
  """Contracts the trailing n_in dims of x with the leading n_in dims of w."""
  return jax.lax.dot_general(
      x, w, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))
