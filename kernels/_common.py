"""Helpers shared by the Pallas kernels: interpret-mode default, block checks, head-dim chunking.

The Triton lowering of Pallas requires every loaded or stored tile to have a power-of-two number of
elements. Head dims such as DeepSeek's 192 (= 128 nope + 64 rope) are therefore read as a few
power-of-two column chunks of the same block (128 then 64) instead of padding the array to 256,
which would cost a copy and a third more matmul work.
"""

from __future__ import annotations

import jax
import numpy as np

# Finite, so that rows with no visible key give exp(MASK - MASK) inside a `where`, never NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def backend() -> str:
  """The default JAX backend ('cpu', 'gpu', 'tpu')."""
  return jax.default_backend()


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means interpret mode on CPU and compiled kernels elsewhere."""
  if interpret is None:
    return backend() == "cpu"
  return bool(interpret)


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
