"""kernels.host_attention: the host BLAS causal MLA attention against the op's reference and the XLA path,
and choosing it (`attention_impl='host'`)."""

import shutil

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.ops import attention
from kernels import host_attention, host_build

_BUILDABLE = shutil.which("c++") or shutil.which("g++")
needs_kernel = pytest.mark.skipif(not host_attention.available() and not _BUILDABLE,
                                  reason=f"host kernels unavailable: {host_build.unavailable_reason()}")


def _case(b, s, h, n, r, v, seed=0, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  shapes = [(b, s, h, n), (b, s, h, r), (b, s, h, n), (b, s, r), (b, s, h, v)]
  args = [jax.random.normal(k, sh) * scale for k, sh in zip(ks, shapes)]
  return args, jax.random.normal(ks[5], (b, s, h, v))


def _value_and_grads(fn, args, c):
  loss = lambda *a: jnp.sum(fn(*a) * c)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)


def _assert_close(got, want, rtol=2e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) <= rtol * scale, (a.shape, float(jnp.max(jnp.abs(a - b))), scale)


@needs_kernel
@pytest.mark.parametrize("b,s,h,n,r,v,block", [
    (2, 37, 3, 8, 4, 5, 8),       # ragged: the last block is partial, dims unequal
    (1, 64, 2, 16, 8, 16, 64),    # one block
    (2, 20, 2, 4, 2, 6, 256),     # block longer than the sequence
    (1, 9, 4, 3, 5, 2, 1),        # one row per block
    (3, 1, 2, 4, 4, 4, 64),       # a single token
])
def test_forward_and_gradients_match_the_reference(b, s, h, n, r, v, block):
  args, c = _case(b, s, h, n, r, v)
  scale = (n + r) ** -0.5
  got = _value_and_grads(lambda *a: host_attention.mla_causal_attention(*a, scale=scale, block=block), args, c)
  want = _value_and_grads(lambda *a: attention.mla_attention_reference(*a, scale=scale), args, c)
  _assert_close(got, want)


@needs_kernel
def test_matches_the_xla_path_with_large_logits():
  """Logits of about +-60 (after scaling): the softmax's max subtraction keeps every value finite."""
  args, c = _case(2, 96, 4, 16, 8, 16, seed=3, scale=3.0)
  got = _value_and_grads(lambda *a: attention.mla_attention(*a, scale=0.2, impl="host"), args, c)
  want = _value_and_grads(lambda *a: attention.mla_attention(*a, scale=0.2, impl="xla"), args, c)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))
  _assert_close(got, want, rtol=1e-4)


@needs_kernel
def test_deterministic():
  args, _ = _case(2, 50, 3, 8, 4, 8, seed=1)
  f = jax.jit(lambda *a: host_attention.mla_causal_attention(*a, scale=0.3))
  assert bool(jnp.array_equal(f(*args), f(*args)))


@needs_kernel
def test_bad_inputs_raise():
  args, _ = _case(1, 8, 2, 4, 2, 4)
  with pytest.raises(ValueError, match="float32"):
    host_attention.mla_causal_attention(args[0].astype(jnp.bfloat16), *args[1:], scale=0.5)
  with pytest.raises(ValueError, match="ranks"):
    host_attention.mla_causal_attention(*args[:3], args[3][:, :, None], args[4], scale=0.5)
  with pytest.raises(ValueError, match="do not match"):
    host_attention.mla_causal_attention(args[0], args[1], args[2][:, :4], *args[3:], scale=0.5)
  with pytest.raises(ValueError, match="scale"):
    host_attention.mla_causal_attention(*args, scale=0.0)
  with pytest.raises(ValueError, match="block"):
    host_attention.mla_causal_attention(*args, scale=0.5, block=0)


@needs_kernel
def test_host_runs_only_where_chosen():
  args, _ = _case(1, 8, 2, 4, 2, 4)
  text = jax.jit(lambda *a: attention.mla_attention(*a, scale=0.5, impl="host")).lower(*args).as_text()
  assert "dsj_host_attention_fwd" in text
  text = jax.jit(lambda *a: attention.mla_attention(*a, scale=0.5)).lower(*args).as_text()
  assert "dsj_host_attention" not in text
  # With a cache (q_slots) the reference path runs whatever the impl.
  slots = jnp.arange(8, dtype=jnp.int32)[None]
  text = jax.jit(lambda *a: attention.mla_attention(*a, scale=0.5, q_slots=slots, impl="host")).lower(
      *args).as_text()
  assert "dsj_host_attention" not in text


def test_unavailable_kernel_raises(monkeypatch):
  args, _ = _case(1, 8, 2, 4, 2, 4)
  monkeypatch.setattr(host_build, "_state", {"reason": "no C++ compiler (test)"})
  with pytest.raises(RuntimeError, match=r"unavailable: no C\+\+ compiler \(test\)"):
    host_attention.mla_causal_attention(*args, scale=0.5)
