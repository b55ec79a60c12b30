"""The model wired to the Pallas kernels (interpret mode on CPU) equals the XLA implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj


@pytest.mark.slow
def test_pallas_model_equals_xla_logits_and_grads(tiny_cfg):
  cfg_x = tiny_cfg.replace(attention_impl="xla", moe_impl="xla")
  cfg_p = tiny_cfg.replace(attention_impl="pallas", moe_impl="pallas")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, tiny_cfg.vocab_size)
  variables = dsj.DeepSeekV3(cfg_x).init(jax.random.PRNGKey(0), tokens)

  def loss(params, cfg):
    out = dsj.DeepSeekV3(cfg).apply({"params": params, "router": variables["router"]}, tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return ce + 0.3 * jnp.mean(out.mtp_logits[0] ** 2), out.logits

  (lx, logits_x), gx = jax.value_and_grad(loss, has_aux=True)(variables["params"], cfg_x)
  (lp, logits_p), gp = jax.value_and_grad(loss, has_aux=True)(variables["params"], cfg_p)
  assert float(jnp.max(jnp.abs(logits_p - logits_x)) / jnp.max(jnp.abs(logits_x))) < 1e-5
  assert abs(float(lp - lx)) < 1e-5 * abs(float(lx))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gx)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    err = float(jnp.max(jnp.abs(a - b))) / scale
    assert err < 1e-4, (jax.tree_util.keystr(path), err)


def test_pallas_decode_path_equals_xla(tiny_cfg):
  """Absorbed decoding over a cache with mla_decode equals the XLA reference (ragged cache lengths)."""
  cfg_x = tiny_cfg.replace(attention_impl="xla")
  cfg_p = tiny_cfg.replace(attention_impl="pallas")
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 2), 0, tiny_cfg.vocab_size)
  variables = dsj.DeepSeekV3(cfg_x).init(jax.random.PRNGKey(0), tokens)
  cache = dsj.init_cache(tiny_cfg, 3, 40, jnp.float32)
  cache = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), cache)
  start = jnp.array([0, 17, 37], jnp.int32)
  outs = [dsj.DeepSeekV3(c).apply(variables, tokens, cache=cache, cache_start=start, absorbed=True,
                                  mtp_tokens=jnp.zeros((3, 3), jnp.int32))
          for c in (cfg_x, cfg_p)]
  np.testing.assert_allclose(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[1].mtp_logits[0], outs[0].mtp_logits[0], rtol=1e-5, atol=1e-5)
