"""Linear projections and parameter helpers shared by every layer.

Every parameter is created through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`) so that `deepseek_jax.sharding` can map it onto a mesh.  Kernels are stored
in the [in..., out...] layout; the HF checkpoint layout [out, in] is a transpose in `deepseek_jax.interop`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import fp8_weights
from deepseek_jax.ops import fp8
from deepseek_jax.ops import matmul as ops_matmul


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
  `deepseek_jax.ops.fp8` (report section 3.3); layers the report keeps in higher precision pass
  `fp8=False`.  With `cfg.fp8_weights`, the layers the released FP8 checkpoints quantize (by name,
  `fp8_weights.FP8_LINEAR_NAMES`) store `kernel` as E4M3 codes plus `kernel_scale_inv` per block
  (`deepseek_jax.layers.fp8_weights`).
  """
  cfg: ModelConfig
  in_shape: tuple
  out_shape: tuple
  axes: tuple  # logical names, len(in_shape) + len(out_shape)
  fp8: bool = True
  std: float | None = None

  def setup(self):
    std = self.cfg.initializer_range if self.std is None else self.std
    shape = tuple(self.in_shape) + tuple(self.out_shape)
    self.fp8_stored = fp8_weights.stores_fp8(self.cfg, self.name, self.fp8)
    if self.fp8_stored:
      self.w, self.w_scale = fp8_weights.fp8_param(self, "kernel", shape, self.axes, n_lead=0,
                                                   n_in=len(self.in_shape), std=std,
                                                   block=self.cfg.fp8_weight_block)
    else:
      self.w = param(self, "kernel", normal_init(std), shape, self.axes, dtype_of(self.cfg.param_dtype))

  def kernel(self):
    """The kernel ([in..., out...]) in its storage dtype; E4M3-stored kernels dequantized to float32."""
    if self.fp8_stored:
      return fp8_weights.dequantize(self.w, self.w_scale, n_lead=0, n_in=len(self.in_shape),
                                    block=self.cfg.fp8_weight_block)
    return self.w

  def __call__(self, x):
    dtype = dtype_of(self.cfg.dtype)
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != tuple(self.in_shape):
      raise ValueError(f"{self.name}: input trailing shape {x.shape[x.ndim - n_in:]} != "
                       f"{tuple(self.in_shape)}")
    if self.fp8_stored and self.fp8 and self.cfg.precision == "fp8":
      # The stored codes are the GEMM's weight operand as they are: no dequantize / requantize.
      b = self.cfg.fp8_weight_block
      matmul = lambda a, w: fp8.fp8_matmul_quantized(a, w, self.w_scale, block=(b, b), out_dtype=dtype)
      return contract(x.astype(dtype), self.w, n_in, matmul=matmul)
    w = self.kernel()
    if self.fp8 and self.cfg.precision == "fp8":
      matmul = lambda a, w: fp8.fp8_matmul(a, w.astype(dtype), out_dtype=dtype)
      return contract(x.astype(dtype), w, n_in, matmul=matmul)
    return contract(x.astype(dtype), w.astype(dtype), n_in,
                    matmul=functools.partial(ops_matmul.matmul, impl=self.cfg.matmul_impl))


def contract(x, w, n_in: int, *, matmul=jnp.dot):
  """Contracts the trailing n_in dims of x with the leading n_in dims of w.

  Runs as one 2-D product `matmul([prod(lead), prod(in)], [prod(in), prod(out)])` (default `jnp.dot`;
  `deepseek_jax.ops.matmul` for `cfg.matmul_impl`, the FP8 GEMMs for the FP8 recipe): with several
  contracting dims (the weight gradient contracts every leading dim of x) XLA:CPU otherwise copies an
  operand transposed before each weight-gradient product.
  """
  lead, in_shape, out_shape = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  k = math.prod(in_shape)
  y = matmul(x.reshape(math.prod(lead), k), w.reshape(k, math.prod(out_shape)))
  return y.reshape(lead + out_shape)
