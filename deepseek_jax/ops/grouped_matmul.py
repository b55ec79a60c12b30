"""Grouped matmul of rows sorted by expert: `jax.lax.ragged_dot` or the Pallas `gmm` kernel."""

import jax

from deepseek_jax.ops.backend import resolve


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto"):
  """out[r] = x[r] @ w[g(r)] for rows r of group g (rows sorted by group; rows past the total give 0).

  Args:
    x: [M, K]; w: [G, K, N]; group_sizes: [G] int32.
    impl: 'auto' | 'xla' (ragged_dot) | 'pallas' (kernels.grouped_matmul.gmm).
  Returns:
    [M, N].
  """
  impl = resolve(impl, field="moe_impl")
  if impl == "pallas":
    from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top
    return gm.gmm(x, w, group_sizes)
  return jax.lax.ragged_dot(x, w, group_sizes.astype("int32"))
