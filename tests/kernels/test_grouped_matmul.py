"""gmm / tgmm vs float64 NumPy, the jnp reference and ragged_dot; dispatch helpers vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch
from kernels import grouped_matmul as gm

BS = gm.BlockSizes(block_m=16, block_k=16, block_n=16, block_m_t=16, block_k_t=16, block_n_t=16,
                   num_warps=4, num_stages=1)
GROUPS = np.array([0, 7, 13, 0, 25], np.int32)      # empty first, empty middle, tiles straddle
K, N = 24, 40                                        # neither a multiple of the 16 tiles


def _numpy_gmm(x, w, dy, group_sizes):
  """float64 out, dx, dw of out = ragged x @ w[g]."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
  out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
  start = 0
  for g, n in enumerate(group_sizes):
    r = slice(start, start + int(n))
    out[r] = x[r] @ w[g]
    dx[r] = dy[r] @ w[g].T
    dw[g] = x[r].T @ dy[r]
    start += int(n)
  return out, dx, dw


def _inputs(m, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (m, K)).astype(dtype),
          jax.random.normal(ks[1], (len(GROUPS), K, N)).astype(dtype),
          jax.random.normal(ks[2], (m, N)).astype(dtype))


@pytest.mark.parametrize("m", [45, 50])             # 50: five rows past sum(group_sizes)
def test_fp32_against_numpy_reference_and_ragged_dot(m, assert_close):
  x, w, dy = _inputs(m, jnp.float32, seed=m)
  gs = jnp.asarray(GROUPS)
  out, pull = jax.vjp(lambda a, b: gm.gmm(a, b, gs, block_sizes=BS), x, w)
  dx, dw = pull(dy)
  want = _numpy_gmm(x, w, dy, GROUPS)
  with jax.default_matmul_precision("float32"):
    ref = gm.gmm_reference(x, w, gs)
    rag, rag_pull = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs), x, w)
    rag_dx, rag_dw = rag_pull(dy)
  for name, g, wv in zip(("out", "dx", "dw"), (out, dx, dw), want):
    assert_close(f"gmm fp32 M={m} {name} vs numpy64", g, wv, 2e-6)
  assert_close(f"gmm fp32 M={m} out vs gmm_reference", out, ref, 2e-6)
  assert_close(f"gmm fp32 M={m} out vs ragged_dot", out, rag, 2e-6)
  assert_close(f"gmm fp32 M={m} dx vs ragged_dot", dx, rag_dx, 2e-6)
  assert_close(f"gmm fp32 M={m} dw vs ragged_dot", dw, rag_dw, 2e-6)
  assert float(jnp.abs(out[45:]).max(initial=0.0)) == 0.0
  assert float(jnp.abs(dw[0]).max()) == 0.0 and float(jnp.abs(dw[3]).max()) == 0.0


def test_bf16_against_numpy(assert_close):
  x, w, dy = _inputs(45, jnp.bfloat16, seed=3)
  out, pull = jax.vjp(lambda a, b: gm.gmm(a, b, jnp.asarray(GROUPS), block_sizes=BS), x, w)
  dx, dw = pull(dy)
  assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  # bf16 inputs, fp32 accumulation, bf16 outputs: rounding of the result dominates (2^-8).
  for name, g, wv in zip(("out", "dx", "dw"), (out, dx, dw), _numpy_gmm(x, w, dy, GROUPS)):
    assert_close(f"gmm bf16 {name} vs numpy64", g, wv, 1e-2)


def test_tgmm_default_blocks(assert_close):
  x, _, dy = _inputs(45, jnp.float32, seed=4)
  got = gm.tgmm(x, dy, jnp.asarray(GROUPS))
  assert_close("tgmm fp32 default blocks vs numpy64", got,
               _numpy_gmm(x, np.zeros((5, K, N)), dy, GROUPS)[2], 2e-6)


def test_dispatch_round_trip_is_a_moe_layer(assert_close):
  """combine(gmm(permute(x))) == sum_k weight_tk * x_t @ w[e_tk], computed token by token."""
  t, k, e, d, f = 13, 3, 5, 16, 24
  ks = jax.random.split(jax.random.key(9), 4)
  ids = jax.random.randint(ks[0], (t, k), 0, e)
  ids = ids.at[:, :].set(jnp.where(ids == 2, 4, ids))   # expert 2 receives no token
  x = jax.random.normal(ks[1], (t, d))
  w = jax.random.normal(ks[2], (e, d, f))
  weights = jax.random.uniform(ks[3], (t, k))
  order, gs, inverse = dispatch.sort_by_expert(ids, num_experts=e)
  np.testing.assert_array_equal(np.asarray(gs), np.bincount(np.asarray(ids).ravel(), minlength=e))
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(t * k))
  xs = dispatch.permute(x, order, k)
  assert np.all(np.diff(np.asarray(ids).ravel()[np.asarray(order)]) >= 0)
  y = dispatch.combine(gm.gmm(xs, w, gs, block_sizes=BS), inverse, weights)
  xn, wn, idn, wtn = (np.asarray(a, np.float64) for a in (x, w, ids, weights))
  want = np.stack([sum(wtn[i, j] * xn[i] @ wn[int(idn[i, j])] for j in range(k)) for i in range(t)])
  assert_close("dispatch+gmm+combine vs per-token numpy64", y, want, 2e-6)


def _v3_routing(rows=65536, groups=256, seed=0):
  """Rows per expert of a skewed random routing with one expert in 16 empty (the compile check's)."""
  from experiments.benchmarks.cuda_compile import v3_group_sizes  # pylint: disable=g-import-not-at-top
  return v3_group_sizes(rows, groups, seed)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("k,n", [(7168, 2048), (2048, 7168)])
def test_issued_work_at_v3_expert_shapes(k, n, dtype):
  """Issued MMA work <= 1.1x the useful FLOPs (each (tile, group) pair visited once)."""
  bs = gm.BlockSizes.get_default("gpu", dtype=dtype)
  for seed in range(3):
    sizes = _v3_routing(seed=seed)
    assert (sizes == 0).sum() >= 16 and sizes.sum() == 65536
    assert gm.gmm_work_ratio(sizes, k, n, bs) <= 1.1
    assert gm.tgmm_work_ratio(sizes, k, n, bs) <= 1.1


def test_gmm_tiles_cover_each_row_once():
  """The tile list writes every row of x exactly once, with the group that holds it (G past the end)."""
  m, bm = 70, 16
  sizes = np.array([0, 7, 13, 0, 25, 1], np.int32)
  tiles = np.asarray(gm._gmm_tiles(jnp.asarray(sizes), m, bm))  # pylint: disable=protected-access
  owner = np.full(m, -2)
  for g, lo, hi in tiles.T:
    if g < 0:
      continue
    assert 0 < hi - lo <= bm and (owner[lo:hi] == -2).all()
    owner[lo:hi] = g
  want = np.concatenate([np.repeat(np.arange(len(sizes)), sizes),
                         np.full(m - sizes.sum(), len(sizes))])
  np.testing.assert_array_equal(owner, want)
