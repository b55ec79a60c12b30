"""The routed experts' SwiGLU FFN on the CPU as an XLA FFI custom call over the host's BLAS.

XLA:CPU runs the many small per-expert products of a dropless MoE layer well below the rate of one flat
matmul, whether as batched matmuls over padded blocks or as `ragged_dot`. Here the same work goes to
single-threaded BLAS `sgemm` calls (MKL or numpy's bundled OpenBLAS: `host_build.blas()`), one per
(expert, tile of at most `TILE` rows), spread over XLA's intra-op thread pool:

  1. the T*K (token, slot) assignments are sorted by expert in the kernel (a stable counting sort);
  2. forward, per tile: gather the tile's token rows, gu = [x Wg | x Wu], h = silu(g) * u, y = h Wd, and
     write y to the rows' flat assignment positions (no padding rows, no weight gathers, no XLA gathers);
     gu is kept for the backward;
  3. backward, per tile: dh = dy Wd^T, d[gu] from the SwiGLU derivative, dx = dg Wg^T + du Wu^T; then per
     expert dWg, dWu, dWd over all its rows.

The C++ source (`host_moe.cc`) is built and loaded on first use by `kernels.host_build`; `available()`
says whether that worked. An opt-in CPU backend (`ModelConfig.moe_impl='host'`): float32 only; one device
(the custom call is opaque to the SPMD partitioner).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import host_build


# Rows per tile: tiles of one expert are independent tasks; 256 keeps 2 threads busy at E16 x 512 rows.
TILE = 256

_FWD, _BWD = "dsj_host_moe_ffn_fwd", "dsj_host_moe_ffn_bwd"


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered (building it on the first call), else the reason."""
  return host_build.unavailable_reason()


def available() -> bool:
  """Whether `host_experts` can run here (a CPU backend, a C++ compiler, an ILP64 BLAS)."""
  return host_build.available()


def _forward_call(x, idx, weights, w_gate, w_up, w_down, tile):
  """(out [T, D], gu [T*K, 2F] in sorted order)."""
  rows, k, f = idx.size, idx.shape[1], w_gate.shape[2]
  out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in (x.shape, (rows, 2 * f)))
  return jax.ffi.ffi_call(_FWD, out)(x, idx, weights, w_gate, w_up, w_down, k=np.int64(k),
                                     tile=np.int64(tile))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ffn(x, idx, weights, w_gate, w_up, w_down, tile):
  """[T, D]: sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) (0 for ids outside [0, E))."""
  return _forward_call(x, idx, weights, w_gate, w_up, w_down, tile)[0]


def _ffn_fwd(x, idx, weights, w_gate, w_up, w_down, tile):
  out, gu = _forward_call(x, idx, weights, w_gate, w_up, w_down, tile)
  return out, (x, idx, weights, w_gate, w_up, w_down, gu)


def _ffn_bwd(tile, res, dout):
  x, idx, weights, w_gate, w_up, w_down, gu = res
  k = idx.shape[1]
  out = tuple(jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in (x, weights, w_gate, w_up, w_down))
  dx, dweights, dwg, dwu, dwd = jax.ffi.ffi_call(_BWD, out)(
      x, idx, weights, w_gate, w_up, w_down, gu, dout.astype(jnp.float32), k=np.int64(k),
      tile=np.int64(tile))
  return dx, None, dweights, dwg, dwu, dwd


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def host_experts(x, idx, weights, w_gate, w_up, w_down, *, tile: int = TILE):
  """sum_k weights[t,k] * expert_{idx[t,k]}(x[t]) with the SwiGLU experts of stacked float32 weights.

  Args:
    x: [T, D] float32 tokens.
    idx, weights: [T, K] expert ids and gate weights (ids outside [0, E) contribute 0).
    w_gate, w_up: [E, D, F]; w_down: [E, F, D], float32.
    tile: rows per task (at most; each tile holds rows of one expert).
  Returns:
    [T, D] float32.
  Raises:
    RuntimeError: the kernel is unavailable here (`unavailable_reason()`).
    ValueError: a dtype other than float32, or mismatched shapes.
  """
  host_build.require("kernels.host_moe")
  for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if a.dtype != jnp.float32:
      raise ValueError(f"host_experts: {name} must be float32, got {a.dtype}")
  e, d, f = w_gate.shape
  if (x.ndim != 2 or idx.ndim != 2 or idx.shape != weights.shape or idx.shape[0] != x.shape[0]
      or x.shape[1] != d or w_up.shape != (e, d, f) or w_down.shape != (e, f, d)):
    raise ValueError(f"host_experts: x {x.shape}, idx {idx.shape}, weights {weights.shape}, w_gate "
                     f"{w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} do not match")
  if int(tile) < 1:
    raise ValueError(f"host_experts: tile must be >= 1, got {tile}")
  out = _ffn(x, jax.lax.stop_gradient(idx).astype(jnp.int32), weights.astype(jnp.float32), w_gate, w_up,
             w_down, int(tile))
  return out.astype(jnp.result_type(x, weights))
