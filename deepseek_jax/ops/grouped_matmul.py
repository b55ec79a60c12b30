"""Grouped matmul of rows sorted by expert: `jax.lax.ragged_dot`, the Pallas `gmm` kernel or tokamax."""

import jax

IMPLS = ("xla", "pallas", "tokamax")


def grouped_matmul(x, w, group_sizes, *, impl: str = "xla", interpret: bool | None = None):
  """out[r] = x[r] @ w[g(r)] for rows r of group g (rows sorted by group; rows past the total give 0).

  Args:
    x: [M, K]; w: [G, K, N]; group_sizes: [G] int32.
    impl: 'xla' (ragged_dot) | 'pallas' (kernels.grouped_matmul.gmm) | 'tokamax' (tokamax.ragged_dot; optional).
    interpret: the Pallas kernel's interpret mode (`ModelConfig.pallas_interpret`).
  Returns:
    [M, N].
  """
  if impl not in IMPLS:
    raise ValueError(f"grouped matmul impl={impl!r}: expected one of {IMPLS}")
  if impl == "pallas":
    from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top
    return gm.gmm(x, w, group_sizes, interpret=interpret)
  if impl == "tokamax":
    from deepseek_jax.ops import tokamax_ragged_dot  # pylint: disable=g-import-not-at-top
    return tokamax_ragged_dot.ragged_dot(x, w, group_sizes)
  return jax.lax.ragged_dot(x, w, group_sizes.astype("int32"))
