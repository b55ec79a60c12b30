"""kernels.host_matmul: the host BLAS matmul and its VJP against jnp.dot, and choosing it
(`matmul_impl='host'`)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.ops import impls
from deepseek_jax.ops import matmul as ops_matmul
from kernels import host_build, host_matmul

_BUILDABLE = shutil.which("c++") or shutil.which("g++")
needs_kernel = pytest.mark.skipif(not host_matmul.available() and not _BUILDABLE,
                                  reason=f"host_matmul unavailable: {host_matmul.unavailable_reason()}")


def _reference(a, b):
  return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


def _operands(m, k, n, seed=0):
  ka, kb = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(ka, (m, k)), jax.random.normal(kb, (k, n))


def _value_and_grads(fn, a, b):
  r = jax.random.normal(jax.random.PRNGKey(7), (a.shape[0], b.shape[1]))
  return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(r * fn(a, b)), argnums=(0, 1)))(a, b)


def _close(got, want, tol=2e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
    scale = float(jnp.max(jnp.abs(w))) if w.size else 0.0
    err = float(jnp.max(jnp.abs(g - w))) if w.size else 0.0
    assert err <= tol * max(scale, 1e-30), (g.shape, err, scale)


@needs_kernel
def test_kernel_builds_here():
  assert host_matmul.unavailable_reason() is None
  assert host_matmul.available()


@needs_kernel
@pytest.mark.parametrize("m,k,n", [
    (1, 1, 1),
    (17, 33, 5),          # ragged, one block (under the serial threshold)
    (5, 33, 170),         # wider than tall: blocks of columns
    (300, 129, 61),       # blocks of rows, a ragged last block
    (37, 700, 333),       # blocks of columns, a ragged last block, long contraction
    (2048, 256, 512),     # a projection of the train bench: every thread busy, each way
    (8, 0, 3),            # empty contraction: zeros
    (0, 8, 3),            # no rows
])
def test_product_and_gradients_match_jnp_dot(m, k, n):
  a, b = _operands(m, k, n)
  _close(jax.jit(host_matmul.host_matmul)(a, b), _reference(a, b))
  _close(_value_and_grads(host_matmul.host_matmul, a, b), _value_and_grads(_reference, a, b))


@needs_kernel
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(300, 45, 70), (40, 45, 300), (3, 2, 1)])
def test_every_operand_layout(trans_a, trans_b, m, k, n):
  # The custom call reads a stored transposed operand in place: all four layouts, split either way.
  a, b = _operands(m, k, n, seed=1)
  a_in, b_in = (a.T if trans_a else a), (b.T if trans_b else b)
  got = jax.jit(lambda x, y: host_matmul._call(x, y, trans_a, trans_b))(a_in, b_in)
  _close(got, _reference(a, b))


@needs_kernel
def test_is_deterministic_and_vmaps():
  a, b = _operands(512, 96, 384, seed=2)
  f = jax.jit(host_matmul.host_matmul)
  np.testing.assert_array_equal(np.asarray(f(a, b)), np.asarray(f(a, b)))
  batch = jnp.stack([a[:64], 2 * a[64:128]])
  _close(jax.vmap(host_matmul.host_matmul, in_axes=(0, None))(batch, b),
         jnp.stack([_reference(x, b) for x in batch]))


@needs_kernel
def test_rejects_other_dtypes_ranks_and_shapes():
  a, b = _operands(4, 6, 3)
  with pytest.raises(ValueError, match="float32"):
    host_matmul.host_matmul(a.astype(jnp.bfloat16), b)
  with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
    host_matmul.host_matmul(a, b[:5])
  with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
    host_matmul.host_matmul(a[None], b)
  with pytest.raises(ValueError, match="float32"):
    ops_matmul.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), impl="host")
  with pytest.raises(ValueError, match="matmul impl"):
    ops_matmul.matmul(a, b, impl="pallas")
  with pytest.raises(ValueError, match="matmul_impl"):
    dsj.ModelConfig.preset("tiny", matmul_impl="blas")


@needs_kernel
def test_host_runs_only_where_chosen():
  a, b = _operands(16, 8, 4)
  assert "dsj_host_matmul" in jax.jit(lambda a, b: ops_matmul.matmul(a, b, impl="host")).lower(a, b).as_text()
  assert "dsj_host_matmul" not in jax.jit(lambda a, b: ops_matmul.matmul(a, b)).lower(a, b).as_text()


def test_unavailable_kernel_raises(monkeypatch):
  a, b = _operands(16, 8, 4)
  monkeypatch.setattr(host_build, "_state", {"reason": "no C++ compiler (test)"})
  with pytest.raises(RuntimeError, match=r"unavailable: no C\+\+ compiler \(test\)"):
    host_matmul.host_matmul(a, b)
  with pytest.raises(ValueError, match=r"matmul_impl='host' needs the host kernels"):
    impls.resolve(dsj.ModelConfig.preset("tiny", matmul_impl="host"), backend="cpu", mesh=None)


@needs_kernel
@pytest.mark.parametrize("remat_policy", ["none", "dots"])
def test_model_loss_and_gradients_match_the_xla_matmul(remat_policy):
  cfg = dsj.ModelConfig.preset("tiny", remat_policy=remat_policy)
  model_x = dsj.DeepSeekV3(cfg.replace(matmul_impl="xla"))
  model_h = dsj.DeepSeekV3(cfg.replace(matmul_impl="host"))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, cfg.vocab_size)
  variables = model_x.init(jax.random.PRNGKey(1), tokens)

  def loss(params, model):
    out = model.apply({**variables, "params": params}, tokens)
    return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits[0] ** 2)

  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(p, m)))(variables["params"])
  assert "dsj_host_matmul" in jax.jit(lambda p: loss(p, model_h)).lower(variables["params"]).as_text()
  (lx, gx), (lh, gh) = grad(model_x), grad(model_h)
  assert abs(float(lx - lh)) <= 1e-6 * abs(float(lx))
  for a, b in zip(jax.tree.leaves(gh), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-9)


@needs_kernel
def test_dots_remat_policies_save_the_host_products():
  # The 'dots' policies keep the host matmul's outputs as they keep a dot_general's: the gradient runs no
  # more host products than without remat, where 'full' reruns the forward's.
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, dsj.ModelConfig.preset("tiny").vocab_size)

  def host_calls(policy):
    cfg = dsj.ModelConfig.preset("tiny", remat_policy=policy, matmul_impl="host")
    model = dsj.DeepSeekV3(cfg)
    variables = model.init(jax.random.PRNGKey(1), tokens)
    loss = lambda p: jnp.mean(model.apply({**variables, "params": p}, tokens).logits ** 2)
    return jax.jit(jax.grad(loss)).lower(variables["params"]).as_text().count("@dsj_host_matmul(")

  none = host_calls("none")
  assert host_calls("full") > none
  assert host_calls("dots") == none
  assert host_calls("dots_with_no_batch_dims") == none
