"""MLA's causal (training / prefill) attention on the CPU as XLA FFI custom calls over the host's BLAS.

The score of query i and key j in head h is q_nope[i,h] . k_nope[j,h] + q_pe[i,h] . k_pe[j] (the rope key
k_pe is shared by the heads), softmax over j <= i, times v. XLA:CPU runs this as batched products over
heads-major copies of the operands, with the rope key broadcast to every head and concatenated, and the
chunked masking as further slices and copies. Here each (batch, head) pair is one task on XLA's intra-op
pool (`host_attention.cc`):

  - the pair's [q_nope | q_pe] and [k_nope | k_pe] rows are packed into two contiguous [S, N + R] buffers;
  - each block of `BLOCK` query rows scores only the keys up to its last row (single-threaded sgemm), takes
    the softmax over the visible keys and multiplies by v read in place; outputs are written in place in
    their [B, S, H, V] layout, with the log-sum-exp of each row for the backward;
  - the backward recomputes each block's probabilities from the log-sum-exp (as flash attention does),
    with dq, dk, dv from five products per block, the blocks taken last to first so that dk and dv
    accumulate in place.

No [B, H, S, S] tensor is stored between the forward and the backward. Built and loaded by
`kernels.host_build`. An opt-in CPU backend (`ModelConfig.attention_impl='host'`): float32 only; one device (the custom call is opaque to the SPMD partitioner).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import host_build

# Query rows per block: each block scores keys 0..its last row, so blocks of 64 skip 3/8 of the products
# at S = 256 while keeping the sgemm calls large enough to run near the BLAS rate.
BLOCK = 64

_FWD, _BWD = "dsj_host_attention_fwd", "dsj_host_attention_bwd"


def available() -> bool:
  """Whether `mla_causal_attention` can run here (see `kernels.host_build`)."""
  return host_build.available()


def _forward_call(q_nope, q_pe, kv, k_pe, scale, block):
  b, s, h, n = q_nope.shape
  out = (jax.ShapeDtypeStruct((b, s, h, kv.shape[3] - n), jnp.float32),
         jax.ShapeDtypeStruct((b, h, s), jnp.float32))
  return jax.ffi.ffi_call(_FWD, out)(q_nope, q_pe, kv, k_pe, scale=np.float32(scale), block=np.int64(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_nope, q_pe, kv, k_pe, scale, block):
  return _forward_call(q_nope, q_pe, kv, k_pe, scale, block)[0]


def _attention_fwd(q_nope, q_pe, kv, k_pe, scale, block):
  out, lse = _forward_call(q_nope, q_pe, kv, k_pe, scale, block)
  return out, (q_nope, q_pe, kv, k_pe, lse)


def _attention_bwd(scale, block, res, d_out):
  q_nope, q_pe, kv, k_pe, lse = res
  shapes = (q_nope.shape, q_pe.shape, kv.shape, q_pe.shape)
  dqn, dqp, dkv, dkp_heads = jax.ffi.ffi_call(
      _BWD, tuple(jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes))(
          q_nope, q_pe, kv, k_pe, lse, d_out.astype(jnp.float32), scale=np.float32(scale),
          block=np.int64(block))
  return dqn, dqp, dkv, dkp_heads.sum(2)


_attention.defvjp(_attention_fwd, _attention_bwd)


def mla_causal_attention(q_nope, q_pe, k_nope, k_pe, v, *, scale: float, block: int = BLOCK):
  """Causal MLA attention (as many keys as queries) in the host kernel.

  Args:
    q_nope: [B, S, H, N]; q_pe: [B, S, H, R]; k_nope: [B, S, H, N]; k_pe: [B, S, R] (shared by the
      heads); v: [B, S, H, V]; all float32.
    scale: softmax scale (> 0).
    block: query rows per block (at least 1).
  Returns:
    [B, S, H, V] float32: query i attends to keys 0..i.
  Raises:
    RuntimeError: the kernel is unavailable here (`kernels.host_build.unavailable_reason()`).
    ValueError: a dtype other than float32, mismatched shapes, scale <= 0 or block < 1.
  """
  host_build.require("kernels.host_attention")
  args = {"q_nope": q_nope, "q_pe": q_pe, "k_nope": k_nope, "k_pe": k_pe, "v": v}
  for name, a in args.items():
    if a.dtype != jnp.float32:
      raise ValueError(f"mla_causal_attention: {name} must be float32, got {a.dtype}")
  if q_nope.ndim != 4 or q_pe.ndim != 4 or k_nope.ndim != 4 or k_pe.ndim != 3 or v.ndim != 4:
    raise ValueError("mla_causal_attention: expected ranks 4, 4, 4, 3, 4, got "
                     + ", ".join(f"{n} {a.shape}" for n, a in args.items()))
  b, s, h, n = q_nope.shape
  r = q_pe.shape[3]
  if (k_nope.shape != (b, s, h, n) or q_pe.shape[:3] != (b, s, h) or k_pe.shape != (b, s, r)
      or v.shape[:3] != (b, s, h)):
    raise ValueError("mla_causal_attention: shapes do not match: "
                     + ", ".join(f"{n} {a.shape}" for n, a in args.items()))
  if not float(scale) > 0:
    raise ValueError(f"mla_causal_attention: scale must be > 0, got {scale}")
  if int(block) < 1:
    raise ValueError(f"mla_causal_attention: block must be >= 1, got {block}")
  # One [k_nope | v] operand, read in place by the kernel: where k_nope and v are the two halves of one
  # projection (MLA's kv_b_proj), XLA folds this concatenation of its slices back into that output.
  kv = jnp.concatenate([k_nope, v], axis=-1)
  return _attention(q_nope, q_pe, kv, k_pe, float(scale), int(block))
