"""The 2-D matmul behind every projection (`deepseek_jax.layers.linear.contract`), by implementation.

'xla' is `jnp.dot`.  'host' (opt-in, CPU float32) is `kernels.host_matmul`: the product and both products of
its backward as BLAS calls in an FFI custom call.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

IMPLS = ("xla", "host")
# The name the host product's output carries for `jax.checkpoint` policies: the 'dots' remat policies
# (`layers.transformer.remat_block`) save it as they save a dot_general's output, which a custom call is not.
PRODUCT_NAME = "host_matmul_product"


def matmul(a, b, *, impl: str = "xla"):
  """a [M, K] @ b [K, N] in `impl` ('xla' | 'host', a concrete `ModelConfig.matmul_impl`); the host product
  is named `PRODUCT_NAME` for remat policies.

  Raises:
    ValueError: an unknown `impl`, or 'host' for operands that are not float32 (`host_matmul`'s checks).
  """
  if impl not in IMPLS:
    raise ValueError(f"matmul impl={impl!r}: expected one of {IMPLS} (deepseek_jax.ops.impls resolves 'auto')")
  if impl == "host":
    from kernels import host_matmul  # pylint: disable=g-import-not-at-top
    return checkpoint_name(host_matmul.host_matmul(a, b), PRODUCT_NAME)
  return jnp.dot(a, b)
