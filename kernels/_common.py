"""Helpers shared by the Pallas kernels: interpret-mode default, block checks, head-dim chunking.

The Triton lowering of Pallas requires every loaded or stored tile to have a power-of-two number of
elements. Head dims such as DeepSeek's 192 (= 128 nope + 64 rope) are therefore read as a few
power-of-two column chunks of the same block (128 then 64) instead of padding the array to 256,
which would cost a copy and a third more matmul work.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import numpy as np

# Finite, so that rows with no visible key give exp(MASK - MASK) inside a `where`, never NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


_TARGET = threading.local()


def backend() -> str:
  """The backend the kernels are built for: the default JAX backend ('cpu', 'gpu', 'tpu'), or the one
  named by an enclosing `target_backend`."""
  return getattr(_TARGET, "name", None) or jax.default_backend()


@contextlib.contextmanager
def target_backend(name: str):
  """Builds kernels traced inside for `name` (e.g. 'gpu': compiled kernels, GPU block sizes) whatever
  the default backend is; for lowering to another platform (`lowering_platforms=('cuda',)`).

  Functions jitted before entering keep what they were traced with: trace fresh ones inside.
  """
  saved = getattr(_TARGET, "name", None)
  _TARGET.name = name
  try:
    yield
  finally:
    _TARGET.name = saved


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means interpret mode on CPU and compiled kernels elsewhere."""
  if interpret is None:
    return backend() == "cpu"
  return bool(interpret)


def dot_precision(dtype):
  """The precision of the kernels' dots: full float32 for float32 operands (never TF32, whatever
  `jax_default_matmul_precision` says), the default (native MMA) for bf16 / fp16."""
  return jax.lax.Precision.HIGHEST if jax.numpy.dtype(dtype) == np.float32 else None


def is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def check_pow2(name: str, value: int) -> None:
  if not is_pow2(value):
    raise ValueError(f"{name}={value} must be a power of two (Triton tiles are).")


def pow2_chunks(dim: int) -> tuple[tuple[int, int], ...]:
  """Splits `dim` into power-of-two (start, size) chunks, largest first.

  Every chunk starts at a multiple of its size, so a chunk is an aligned slice: 192 -> ((0, 128),
  (128, 64)); 128 -> ((0, 128),).
  """
  chunks, start = [], 0
  for bit in reversed(range(dim.bit_length())):
    size = 1 << bit
    if dim & size:
      chunks.append((start, size))
      start += size
  return tuple(chunks)


def fit_block(block: int, length: int, minimum: int = 16) -> int:
  """Shrinks a power-of-two block to the smallest power of two covering `length` (>= minimum)."""
  return max(min(block, int(pl_next_pow2(length))), min(minimum, block))


def pl_next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def cdiv(a: int, b: int) -> int:
  return -(-a // b)
