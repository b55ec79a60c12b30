"""Resolves an implementation choice ('auto' | 'xla' | 'pallas' | ...) for the current backend."""

import jax


def on_gpu() -> bool:
  """Whether the default backend is a GPU."""
  return jax.default_backend() == "gpu"


def resolve(impl: str, *, field: str) -> str:
  """'auto' becomes 'pallas' on GPU and 'xla' elsewhere; other values pass through."""
  if impl == "auto":
    return "pallas" if on_gpu() else "xla"
  if impl not in ("xla", "pallas", "dense"):
    raise ValueError(f"{field}={impl!r}: expected auto, xla or pallas")
  return impl
