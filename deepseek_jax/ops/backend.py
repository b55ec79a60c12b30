"""Resolves an implementation choice ('auto' | 'xla' | 'pallas' | ...) for the current backend."""

import jax


def on_gpu() -> bool:
  """Whether the default backend is a GPU."""
  return jax.default_backend() == "gpu"


def resolve(impl: str, *, field: str) -> str:
  """'auto' becomes 'pallas' on GPU and 'xla' elsewhere; other values pass through (where a host kernel
  does not apply, 'host' runs as 'xla')."""
  if impl == "auto":
    return "pallas" if on_gpu() else "xla"
  if impl not in ("xla", "pallas", "dense", "host"):
    raise ValueError(f"{field}={impl!r}: expected auto, xla, host or pallas")
  return impl


def _varying_axes(x) -> frozenset:
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)   # jax >= 0.10
  return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def vary_like(w, x):
  """w marked varying over the manual mesh axes x varies over (inside `jax.shard_map`; a no-op outside).

  A custom VJP must return each cotangent with its primal's type; the weight gradient of a product with
  per-device tokens varies over the token axes, so the weights go in with that type already.  Autodiff then
  transposes the cast into the psum over those axes that the weight gradient needs.
  """
  extra = tuple(sorted(_varying_axes(x) - _varying_axes(w)))
  if not extra:
    return w
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(w, extra, to="varying")
  return jax.lax.pvary(w, extra)
