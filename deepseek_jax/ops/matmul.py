"""The 2-D matmul behind every projection (`deepseek_jax.layers.linear.contract`), by implementation.

'xla' is `jnp.dot`.  'host' is `kernels.host_matmul`: the product and both products of its backward as
BLAS calls in an FFI custom call (CPU, float32, one device), for XLA:CPU runs a projection's weight
gradient, which contracts the token dimension that leads both operands, well below its forward rate.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import MATMUL_IMPLS
from kernels import host_build, host_matmul

# The name the host product's output carries for `jax.checkpoint` policies: the 'dots' remat policies
# (`layers.transformer.remat_block`) save it as they save a dot_general's output, which a custom call is not.
PRODUCT_NAME = "host_matmul_product"


def resolved_impl(impl: str, *dtypes) -> str:
  """The implementation `matmul` runs for `impl` and operands of these dtypes: 'auto' is 'host' on CPU for
  float32 operands on one device where the kernel builds, else 'xla'; other values are themselves."""
  if impl not in MATMUL_IMPLS:
    raise ValueError(f"matmul_impl={impl!r}: expected one of {MATMUL_IMPLS}")
  if impl == "auto":
    usable = host_build.usable_for(*dtypes, what="kernels.host_matmul",
                                   fallback="CPU projections use jnp.dot")
    return "host" if usable else "xla"
  return impl


def matmul(a, b, *, impl: str = "auto"):
  """a [M, K] @ b [K, N] in the implementation `resolved_impl(impl, a.dtype, b.dtype)` picks (the host
  product named `PRODUCT_NAME` for remat policies).

  Raises:
    ValueError: an unknown `impl`, or 'host' for operands that are not float32 (`host_matmul`'s checks).
    RuntimeError: 'host' where the host kernels are unavailable.
  """
  if resolved_impl(impl, a.dtype, b.dtype) == "host":
    return checkpoint_name(host_matmul.host_matmul(a, b), PRODUCT_NAME)
  return jnp.dot(a, b)
