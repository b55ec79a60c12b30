"""Grouped matmul through tokamax's `ragged_dot` (its Mosaic GPU kernel on Hopper, XLA's ragged_dot
elsewhere): an alternative to `kernels.grouped_matmul.gmm` for the routed experts. tokamax is optional
(`pip install tokamax`, Python >= 3.11); docs/gpu.md compares the two."""

import jax.numpy as jnp


def available() -> bool:
  """Whether tokamax is importable."""
  try:
    import tokamax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def ragged_dot(x, w, group_sizes, *, implementation: str | None = None):
  """out[r] = x[r] @ w[g(r)] for the rows r of group g (rows sorted by group; rows past the total are 0).

  Args:
    x: [M, K]; w: [G, K, N] in x's dtype; group_sizes: [G] integer.
    implementation: tokamax's choice ('mosaic_gpu', 'triton', 'xla', ...); None lets tokamax pick for
      the default device (Mosaic GPU on Hopper, falling back to XLA).
  Returns:
    [M, N] in x's dtype; differentiable in x and w.
  """
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the tokamax grouped matmul needs the tokamax package: pip install tokamax") from e
  return tokamax.ragged_dot(x, w, group_sizes.astype(jnp.int32), implementation=implementation)
