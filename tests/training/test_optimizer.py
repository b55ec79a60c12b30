"""Schedules (the report's shapes at the phase boundaries), the decay mask, AdamW against optax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.training import Schedules, decay_mask, make_optimizer
from deepseek_jax.training import config as config_lib


def test_report_fractions():
  # Report section 4.2 in tokens of 14.8T: 10T constant, 14.3T end of cosine, +333B, +167B.
  assert config_lib.CONSTANT_UNTIL == pytest.approx(10 / 14.8)
  assert config_lib.COSINE_UNTIL == pytest.approx(14.3 / 14.8)
  assert config_lib.TAIL_UNTIL == pytest.approx(14.633 / 14.8)
  assert config_lib.MIN_LR_RATIO == pytest.approx(0.1)
  assert config_lib.FINAL_LR_RATIO * 2.2e-4 == pytest.approx(7.3e-6)
  # 2K warmup steps of 14.8T / (15360 x 4096) ~ 235K steps.
  assert config_lib.WARMUP_FRACTION == pytest.approx(2000 / 235_245, rel=1e-3)


def test_learning_rate_phases():
  steps, peak = 14800, 2.2e-4
  s = Schedules(steps=steps, lr=peak, warmup_fraction=2000 / 14800)
  lr = lambda t: float(s.learning_rate(t))
  # Linear warmup: update t gets peak * (t + 1) / 2000.
  assert lr(0) == pytest.approx(peak / 2000, rel=1e-5)
  assert lr(999) == pytest.approx(peak * 0.5, rel=1e-5)
  assert lr(1999) == pytest.approx(peak, rel=1e-6)
  # Constant until 10T tokens (step 10000 of 14800), then cosine to peak / 10 at 14.3T.
  assert lr(5000) == pytest.approx(peak, rel=1e-6)
  assert lr(9999) == pytest.approx(peak, rel=1e-6)
  assert lr(10000) == pytest.approx(peak, rel=1e-6)
  mid = 10000 + 4300 / 2
  assert lr(mid) == pytest.approx(2.2e-5 + (peak - 2.2e-5) * 0.5, rel=1e-4)
  q = 10000 + 4300 / 4
  assert lr(q) == pytest.approx(2.2e-5 + (peak - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-4)
  # 2.2e-5 for 333B tokens, 7.3e-6 for the last 167B.
  assert lr(14300) == pytest.approx(2.2e-5, rel=1e-5)
  assert lr(14632) == pytest.approx(2.2e-5, rel=1e-5)
  assert lr(14634) == pytest.approx(7.3e-6, rel=1e-5)
  assert lr(14799) == pytest.approx(7.3e-6, rel=1e-5)
  # Monotone non-increasing after warmup.
  vals = np.asarray(s.learning_rate(jnp.arange(2000, 14800)))
  assert np.all(np.diff(vals) <= 1e-12)


def test_mtp_and_gamma_switches():
  s = Schedules(steps=1480)
  assert float(s.mtp_lambda(0)) == pytest.approx(0.3)
  assert float(s.mtp_lambda(999)) == pytest.approx(0.3)
  assert float(s.mtp_lambda(1000)) == pytest.approx(0.1)
  assert float(s.bias_gamma(0)) == pytest.approx(0.001)
  assert float(s.bias_gamma(1429)) == pytest.approx(0.001)
  assert float(s.bias_gamma(1430)) == 0.0


def test_batch_ramp():
  # 3072 -> 15360 over the first 469B of 14.8T tokens, in whole multiples of 3072.
  s = Schedules(steps=14800, batch_size=15360, ramp=True)
  ramp_end = 14800 * 0.469 / 14.8
  sizes = [s.global_batch(t) for t in range(0, 14800, 7)]
  assert sizes[0] == 3072 and s.global_batch(int(ramp_end) + 1) == 15360
  assert set(sizes) == {3072, 6144, 9216, 12288, 15360}
  assert all(b >= a for a, b in zip(sizes, sizes[1:]))
  assert s.global_batch(0, quantum=1000) == 3000
  assert Schedules(steps=10, batch_size=64).global_batch(0) == 64


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"embed_tokens": {"embedding": jax.random.normal(k[0], (11, 4))},
          "layers_0": {"norm": {"weight": jnp.ones((4,))},
                       "proj": {"kernel": jax.random.normal(k[1], (4, 3))}},
          "experts": {"up_proj": jax.random.normal(k[2], (2, 4, 3))}}


def test_decay_mask():
  m = decay_mask(_params())
  assert m == {"embed_tokens": {"embedding": False}, "layers_0": {"norm": {"weight": False},
               "proj": {"kernel": True}}, "experts": {"up_proj": True}}
  assert decay_mask(_params(), decay_embeddings=True)["embed_tokens"]["embedding"] is True


@pytest.mark.parametrize("mu_dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_adamw_matches_optax(mu_dtype, tol):
  params = _params()
  lr = 1e-2
  tx = make_optimizer(params, weight_decay=0.1, clip_norm=1.0, mu_dtype=mu_dtype)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask(params)))
  s, r = tx.init(params), ref.init(params)
  p, q = params, params
  for i in range(5):
    g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 3.0, p)  # norm > 1: the clip is active
    u, s = tx.update(g, s, p)
    p = jax.tree.map(lambda a, b: a - lr * b, p, u)
    gq = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 3.0, q)
    v, r = ref.update(gq, r, q)
    q = optax.apply_updates(q, v)
  err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
  assert err < tol * lr * 10
  if mu_dtype == "bfloat16":
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s[1].mu) + jax.tree.leaves(s[1].nu))
