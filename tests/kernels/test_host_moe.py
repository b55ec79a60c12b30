"""kernels.host_moe: the host BLAS expert FFN against the dense reference (`moe_dispatch.dense_experts`), and
choosing it (`moe_impl='host'`)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers.moe import routed_experts
from deepseek_jax.ops import moe_dispatch
from kernels import host_build, host_moe

# Where a compiler and numpy's ILP64 OpenBLAS are present (CI's machine) the kernel must build.
_BUILDABLE = shutil.which("c++") or shutil.which("g++")
needs_kernel = pytest.mark.skipif(not host_moe.available() and not _BUILDABLE,
                                  reason=f"host_moe unavailable: {host_moe.unavailable_reason()}")


def _case(t, e, k, d, f, seed=0, skew=0.0, scale=0.1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(ks[0], (t, d))
  logits = jax.random.normal(ks[1], (t, e)) + skew * jnp.linspace(0.0, 1.0, e)
  weights, idx = jax.lax.top_k(jax.nn.sigmoid(logits), k)
  ws = [jax.random.normal(kk, s) * scale for kk, s in zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)])]
  return x, idx.astype(jnp.int32), weights, ws


def _reference(x, idx, weights, w_gate, w_up, w_down):
  """The dense reference; assignments to ids outside [0, E) contribute nothing."""
  valid = (idx >= 0) & (idx < w_gate.shape[0])
  return moe_dispatch.dense_experts(x, jnp.where(valid, idx, 0), jnp.where(valid, weights, 0), w_gate, w_up,
                                    w_down)


def _value_and_grads(fn, x, idx, weights, ws):
  def loss(x, weights, wg, wu, wd):
    return jnp.sum(jnp.sin(fn(x, idx, weights, wg, wu, wd)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, weights, *ws)


def _assert_close(got, want, rtol=1e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) <= rtol * scale, (a.shape, float(jnp.max(jnp.abs(a - b))), scale)


@needs_kernel
def test_kernel_builds_here():
  assert host_moe.unavailable_reason() is None
  assert host_moe.available()


@needs_kernel
@pytest.mark.parametrize("t,e,k,d,f,tile,skew", [
    (512, 16, 4, 64, 32, 256, 0.0),    # several tiles per expert
    (37, 5, 2, 24, 16, 8, 6.0),        # ragged, skewed: some experts empty, tiles of 8
    (64, 8, 1, 32, 8, 4, 0.0),         # top-1, tiny tiles
    (200, 3, 3, 16, 48, 1024, 0.0),    # every expert routed by every token, one tile each
])
def test_forward_and_gradients_match_the_reference(t, e, k, d, f, tile, skew):
  x, idx, weights, ws = _case(t, e, k, d, f, skew=skew)
  got = _value_and_grads(lambda *a: host_moe.host_experts(*a, tile=tile), x, idx, weights, ws)
  want = _value_and_grads(_reference, x, idx, weights, ws)
  _assert_close(got, want)
  if skew:   # the case does exercise empty experts
    assert int(jnp.min(jnp.bincount(idx.reshape(-1), length=e))) == 0


@needs_kernel
def test_assignments_outside_the_experts_contribute_nothing():
  x, idx, weights, ws = _case(48, 6, 3, 16, 8, seed=3)
  idx = idx.at[:5, 0].set(6).at[7, 2].set(-1)   # unrouted assignments (e.g. a mask)
  got = _value_and_grads(host_moe.host_experts, x, idx, weights, ws)
  want = _value_and_grads(_reference, x, idx, weights, ws)
  _assert_close(got, want)


@needs_kernel
def test_large_activations_stay_finite_and_exact():
  # |gate| above 100: exp(-gate) overflows for the negative ones, silu must still be 0 there.  A linear
  # loss (sin of outputs this large would magnify float32 rounding).
  x, idx, weights, ws = _case(64, 4, 2, 16, 8, seed=5, scale=8.0)
  assert float(jnp.max(jnp.abs(jnp.einsum("TD,EDF->TEF", x, ws[0])))) > 100
  r = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def value_and_grads(fn):
    loss = lambda x, weights, wg, wu, wd: jnp.sum(r * fn(x, idx, weights, wg, wu, wd))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, weights, *ws)

  got, want = value_and_grads(host_moe.host_experts), value_and_grads(_reference)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got))
  _assert_close(got, want, rtol=2e-5)


@needs_kernel
def test_matches_the_blocked_layout_and_is_deterministic():
  x, idx, weights, ws = _case(256, 16, 4, 32, 16, seed=1)
  y = jax.jit(host_moe.host_experts)(x, idx, weights, *ws)
  again = jax.jit(host_moe.host_experts)(x, idx, weights, *ws)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(again))
  blocked = moe_dispatch.blocked_experts(x, idx, weights, *ws)
  _assert_close(y, blocked)


@needs_kernel
def test_rejects_other_dtypes_mismatched_shapes_and_empty_tiles():
  x, idx, weights, ws = _case(16, 4, 2, 8, 8)
  with pytest.raises(ValueError, match="float32"):
    host_moe.host_experts(x.astype(jnp.bfloat16), idx, weights, *ws)
  with pytest.raises(ValueError, match="do not match"):
    host_moe.host_experts(x[:8], idx, weights, *ws)
  with pytest.raises(ValueError, match="tile"):
    host_moe.host_experts(x, idx, weights, *ws, tile=0)


@needs_kernel
def test_host_runs_only_where_chosen():
  x, idx, weights, ws = _case(32, 4, 2, 8, 8)
  text = jax.jit(lambda *a: routed_experts(*a, impl="host")).lower(x, idx, weights, *ws).as_text()
  assert "dsj_host_moe_ffn_fwd" in text
  for impl in ("blocked", "xla", "dense"):
    text = jax.jit(lambda *a, i=impl: routed_experts(*a, impl=i)).lower(x, idx, weights, *ws).as_text()
    assert "dsj_host_moe" not in text


def test_unavailable_kernel_raises(monkeypatch):
  x, idx, weights, ws = _case(32, 4, 2, 8, 8)
  monkeypatch.setattr(host_build, "_state", {"reason": "no C++ compiler (test)"})
  assert not host_moe.available()
  with pytest.raises(RuntimeError, match=r"unavailable: no C\+\+ compiler \(test\)"):
    host_moe.host_experts(x, idx, weights, *ws)
