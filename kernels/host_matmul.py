"""A float32 matmul on the CPU as an XLA FFI custom call over the host's BLAS, with its VJP.

XLA:CPU runs the weight gradient of a projection, x^T dy (contracting the token dimension, which leads
both operands), well below its rate for the forward product, and its products stay below the BLAS's rate
even in the forward layout. `host_matmul(a, b)` runs `a @ b` and both products of its backward
(da = dc b^T, db = a^T dc) as single-threaded BLAS `sgemm` calls (MKL or numpy's bundled OpenBLAS:
`host_build.blas()`) on blocks of the output's rows or columns spread over XLA's intra-op thread pool; the
BLAS reads a transposed operand where it is stored.

The C++ source (`host_matmul.cc`) is built and loaded on first use by `kernels.host_build`; `available()`
says whether that worked. An opt-in CPU backend (`ModelConfig.matmul_impl='host'`): float32 only; one device (the custom call is opaque to the SPMD partitioner).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import host_build

_TARGET = "dsj_host_matmul"


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered (building it on the first call), else the reason."""
  return host_build.unavailable_reason()


def available() -> bool:
  """Whether `host_matmul` can run here (a CPU backend, a C++ compiler, a BLAS)."""
  return host_build.available()


def _call(a, b, trans_a: bool, trans_b: bool):
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  # Under vmap, one call per batch element.
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def _matmul(a, b):
  return _call(a, b, False, False)


def _matmul_fwd(a, b):
  return _call(a, b, False, False), (a, b)


def _matmul_bwd(res, dc):
  a, b = res
  dc = dc.astype(jnp.float32)
  return _call(dc, b, False, True), _call(a, dc, True, False)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def host_matmul(a, b):
  """a @ b for float32 matrices a [M, K] and b [K, N], differentiable, in BLAS calls.

  Raises:
    RuntimeError: the kernel is unavailable here (`unavailable_reason()`).
    ValueError: operands that are not 2-D float32 matrices with matching contracting dims.
  """
  host_build.require("kernels.host_matmul")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"host_matmul: expected [M, K] @ [K, N], got {a.shape} and {b.shape}")
  for name, x in (("a", a), ("b", b)):
    if x.dtype != jnp.float32:
      raise ValueError(f"host_matmul: {name} must be float32, got {x.dtype}")
  return _matmul(a, b)
