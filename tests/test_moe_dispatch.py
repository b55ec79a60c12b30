"""Dispatch implementations against a token-by-token float64 NumPy MoE, including imbalanced routing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers.moe import routed_experts
from deepseek_jax.ops import moe_dispatch


def _numpy_moe(x, idx, w, wg, wu, wd):
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j, e in enumerate(np.asarray(idx[t])):
      g = x[t] @ wg[e]
      h = g / (1 + np.exp(-g)) * (x[t] @ wu[e])
      out[t] += float(w[t, j]) * (h @ wd[e])
  return out


@pytest.mark.parametrize("impl,block", [("dense", None), ("xla", None), ("blocked", 8), ("blocked", None)])
@pytest.mark.parametrize("skew", [False, True])
def test_dispatch_against_numpy(impl, block, skew):
  t, k, e, d, f = 37, 3, 6, 16, 12
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (t, d))
  if skew:   # nearly everything on expert 4, expert 1 and 2 empty
    idx = jnp.stack([jnp.full((t,), 4), jnp.full((t,), 0), jnp.arange(t) % 2 * 5 + (jnp.arange(t) % 2 == 0) * 3],
                    axis=1)
  else:
    idx = jnp.argsort(jax.random.uniform(keys[1], (t, e)), axis=-1)[:, :k]
  w = jax.random.uniform(keys[2], (t, k))
  wg, wu = (jax.random.normal(kk, (e, d, f)) / 4 for kk in keys[3:5])
  wd = jax.random.normal(keys[5], (e, f, d)) / 4
  if impl == "blocked":
    fn = lambda *a: moe_dispatch.blocked_experts(*a, block=block)
  else:
    fn = lambda *a: routed_experts(*a, impl=impl)
  np.testing.assert_allclose(fn(x, idx, w, wg, wu, wd), _numpy_moe(x, idx, w, wg, wu, wd),
                             rtol=1e-5, atol=1e-5)
  # Gradients against the dense reference.
  loss = lambda f_: lambda *a: jnp.sum(jnp.sin(f_(*a)))
  ref = lambda *a: moe_dispatch.dense_experts(*a)
  g = jax.grad(loss(fn), argnums=(0, 2, 3, 4, 5))(x, idx, w, wg, wu, wd)
  g_ref = jax.grad(loss(ref), argnums=(0, 2, 3, 4, 5))(x, idx, w, wg, wu, wd)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_block_size_heuristic():
  assert moe_dispatch.block_size_for(8192, 16) == 128
  assert moe_dispatch.block_size_for(4096, 64) == 128      # up to 2x padding is still faster on CPU
  assert moe_dispatch.block_size_for(2048 * 8, 256) == 128  # padding bound 256 x 127 <= 8 x rows
  assert moe_dispatch.block_size_for(40, 4) == 64          # one block holds every row
  assert moe_dispatch.block_size_for(100, 16) == 32        # 16 x 31 <= 800 < 16 x 63
  assert moe_dispatch.block_size_for(64, 256) == 8         # decoding 8 tokens x top-8 over 256 experts
  for rows, e in [(1, 1), (7, 3), (100, 16), (8192, 256), (10 ** 6, 8)]:
    b = moe_dispatch.block_size_for(rows, e)
    assert 8 <= b <= 128 and b & (b - 1) == 0


def test_chain_count_heuristic():
  assert moe_dispatch.chains_for(80, 128) == moe_dispatch.BLOCK_CHAINS   # train step: 10,240 slot rows
  assert moe_dispatch.chains_for(16, 8) == 1                            # decoding: 128 slot rows
  assert moe_dispatch.chains_for(3, 1024) == 3                          # at most one chain per block
  for blocks, block in [(1, 8), (7, 64), (80, 128), (10 ** 4, 128)]:
    assert 1 <= moe_dispatch.chains_for(blocks, block) <= min(blocks, moe_dispatch.BLOCK_CHAINS)


def test_capacity_experts_drops_exactly_the_overflow():
  t, k, e, d, f = 40, 2, 4, 8, 6
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  x = jax.random.normal(keys[0], (t, d))
  idx = jnp.stack([jnp.zeros((t,), jnp.int32), 1 + jnp.arange(t) % 3], axis=1)   # expert 0 overloaded
  w = jax.random.uniform(keys[1], (t, k))
  wg, wu = (jax.random.normal(kk, (e, d, f)) for kk in keys[2:4])
  wd = jax.random.normal(keys[4], (e, f, d))
  cf = 1.0
  cap = int(np.ceil(cf * t * k / e))
  y, dropped = moe_dispatch.capacity_experts(x, idx, w, wg, wu, wd, capacity_factor=cf)
  # Reference: count per expert in token order, zero the weights past capacity.
  counts, keep = np.zeros(e, int), np.ones((t, k), bool)
  for i in range(t):
    for j in range(k):
      ex = int(idx[i, j])
      keep[i, j] = counts[ex] < cap
      counts[ex] += 1
  np.testing.assert_allclose(float(dropped), 1 - keep.mean(), rtol=1e-6)
  ref = _numpy_moe(x, idx, np.asarray(w) * keep, wg, wu, wd)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  y_big, dropped_big = moe_dispatch.capacity_experts(x, idx, w, wg, wu, wd, capacity_factor=e)
  assert float(dropped_big) == 0.0
  np.testing.assert_allclose(y_big, _numpy_moe(x, idx, w, wg, wu, wd), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chains", [1, 4])
def test_blocked_backward_regathers_instead_of_keeping_gathered_operands(capsys, chains):
  t, d, f, e, k = 64, 16, 8, 4, 2
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (t, d))
  idx = jax.random.randint(keys[1], (t, k), 0, e)
  w = jax.random.uniform(keys[2], (t, k))
  wg, wu = jax.random.normal(keys[3], (e, d, f)), jax.random.normal(keys[4], (e, d, f))
  wd = jax.random.normal(keys[5], (e, f, d))
  loss = lambda x, w, wg, wu, wd: jnp.sum(
      moe_dispatch.blocked_experts(x, idx, w, wg, wu, wd, block=16, chains=chains) ** 2)
  jax.ad_checkpoint.print_saved_residuals(loss, x, w, wg, wu, wd)
  shapes = set(re.findall(r"\[([\d,]+)\]", capsys.readouterr().out))
  n = moe_dispatch.blocked_layout(idx, e, 16)[2].shape[0]
  assert n % chains == 0
  n //= chains   # blocks per chain
  gathered = {f"{n},{d},{2 * f}", f"{n},{f},{d}", f"{n},16,{d}", f"{n * 16},{d}"}  # block weights, rows
  assert f"{t},{d}" in shapes and not gathered & shapes, shapes


@pytest.mark.parametrize("chains", [2, 3, 5, 64])
def test_blocked_chains_agree_with_one_chain(chains):
  """Splitting the blocks into independent ranges (uneven, or more ranges than blocks) changes nothing."""
  t, d, f, e, k = 50, 16, 8, 6, 3
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  x = jax.random.normal(keys[0], (t, d))
  idx = jnp.argsort(jax.random.uniform(keys[1], (t, e)), axis=-1)[:, :k]
  w = jax.random.uniform(keys[2], (t, k))
  wg, wu = (jax.random.normal(kk, (e, d, f)) / 4 for kk in keys[3:5])
  wd = jax.random.normal(keys[5], (e, f, d)) / 4
  loss = lambda s: lambda *a: jnp.sum(jnp.sin(moe_dispatch.blocked_experts(*a, block=8, chains=s)))
  args = (x, idx, w, wg, wu, wd)
  np.testing.assert_allclose(loss(chains)(*args), loss(1)(*args), rtol=1e-6)
  for a, b in zip(jax.grad(loss(chains), argnums=(0, 2, 3, 4, 5))(*args),
                  jax.grad(loss(1), argnums=(0, 2, 3, 4, 5))(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
