"""Loss parts against float64 references, the bias rule, and the train step's accumulation and NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.model import ModelOutput
from deepseek_jax.training import (Schedules, bias_paths, make_optimizer, make_train_step, objective,
                                   update_bias)
from deepseek_jax.training.state import init_state


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_objective_matches_float64_reference():
  rng = np.random.default_rng(0)
  b, s, v = 2, 7, 11
  logits = rng.normal(size=(b, s, v)).astype(np.float32) * 3
  mtp = tuple(rng.normal(size=(b, s, v)).astype(np.float32) * 3 for _ in range(2))
  tokens = rng.integers(0, v, size=(b, s + 3))
  targets = tokens[:, 1:s + 1]
  bal = np.array([1.2, 0.9, 1.5], np.float32)
  out = ModelOutput(logits=jnp.asarray(logits), mtp_logits=tuple(map(jnp.asarray, mtp)),
                    balance_loss=jnp.asarray(bal))
  loss, parts = objective(out, jnp.asarray(targets), mtp_lambda=0.3, alpha=0.01)
  ce = -np.take_along_axis(_log_softmax64(logits), targets[..., None], -1).mean()
  depth_means = []
  for k, lg in enumerate(mtp, start=1):
    lp = _log_softmax64(lg)
    # Position i of depth k predicts token i + k + 1 = tokens[:, i + k + 1]; only i < s - k has a target.
    nll = [-lp[bb, i, tokens[bb, i + k + 1]] for bb in range(b) for i in range(s - k)]
    depth_means.append(np.mean(nll))
  ref = ce + 0.3 * np.mean(depth_means) + 0.01 * bal.mean()
  assert float(parts["ce"]) == pytest.approx(ce, abs=1e-5)
  assert float(parts["mtp"]) == pytest.approx(np.mean(depth_means), abs=1e-5)
  assert float(loss) == pytest.approx(ref, abs=1e-5)


def test_bias_paths_numeric_order_and_update_rule():
  mk = lambda: {"mlp": {"gate": {"e_score_correction_bias": jnp.zeros((4,), jnp.float32)}}}
  router = {"mtp_0": {"block": mk()}, "layers_10": mk(), "layers_2": mk(), "layers_9": mk()}
  assert [p[0] for p in bias_paths(router)] == ["layers_2", "layers_9", "layers_10", "mtp_0"]
  tpe = np.array([[10, 0, 5, 5], [1, 2, 3, 6], [4, 4, 4, 4], [0, 0, 0, 8]], np.float32)
  new = update_bias(router, jnp.asarray(tpe), 0.001)
  for row, name in enumerate(["layers_2", "layers_9", "layers_10", "mtp_0"]):
    node = new[name]["block"] if name == "mtp_0" else new[name]
    got = np.asarray(node["mlp"]["gate"]["e_score_correction_bias"])
    want = 0.001 * np.sign(tpe[row].mean() - tpe[row])  # overloaded down, underloaded up, balanced 0
    np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.fixture(scope="module")
def setup():
  cfg = dsj.ModelConfig.preset("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
                               q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                               v_head_dim=8)
  model = dsj.DeepSeekV3(cfg)
  tx_factory = lambda p: make_optimizer(p)
  state, tx, _ = init_state(model, tx_factory, jax.random.PRNGKey(0), 16)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  sched = Schedules(steps=10, lr=1e-2, warmup_fraction=0.0, gamma=0.01)
  return model, state, tx, batch, sched


@pytest.fixture(scope="module")
def plain_step(setup):
  """The accum=1 step, compiled once for the tests that share it."""
  model, _, tx, _, sched = setup
  return make_train_step(model, tx, sched, alpha=0.01, grad_accum=1, donate=False)


def test_grad_accumulation_matches_full_batch(setup, plain_step):
  model, state, tx, batch, sched = setup
  s1, m1 = plain_step(state, batch)
  s2, m2 = make_train_step(model, tx, sched, alpha=0.01, grad_accum=2, donate=False)(state, batch)
  for k in ("loss", "ce", "mtp", "balance", "grad_norm"):
    assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-6), k
  # Loads are summed over microbatches: every token counted once per MoE layer (2 routed each).
  np.testing.assert_allclose(np.asarray(m1["tokens_per_expert"]), np.asarray(m2["tokens_per_expert"]))
  assert np.asarray(m1["tokens_per_expert"]).sum(-1).tolist() == [4 * 16 * 2] * 2
  err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params),
                                                       jax.tree.leaves(s2.params)))
  # Adam's first step is about lr * sign(g) per element, which magnifies float rounding in near-zero
  # gradients; 1% of lr bounds that while catching any real mismatch (which moves elements by ~lr).
  assert err < 1e-2 * 1e-2
  # The bias moved by exactly gamma against the load, from the whole batch's counts.
  tpe = np.asarray(m1["tokens_per_expert"])
  for row, path in enumerate(bias_paths(s1.router)):
    node = s1.router
    for p in path:
      node = node[p]
    np.testing.assert_allclose(np.asarray(node), 0.01 * np.sign(tpe[row].mean() - tpe[row]), atol=1e-9)
  assert int(s1.step) == 1 and int(s1.skipped) == 0


def test_non_finite_step_is_skipped(setup, plain_step):
  _, state, _, batch, _ = setup
  params = jax.tree.map(lambda x: x, state.params)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  bad = state.replace(params=params)
  step = plain_step
  new, m = step(bad, batch)
  assert not np.isfinite(float(m["loss"]))
  assert int(new.step) == 1 and int(new.skipped) == 1 and int(new.bad_streak) == 1
  for a, b in zip(jax.tree.leaves((bad.params, bad.opt_state, bad.router)),
                  jax.tree.leaves((new.params, new.opt_state, new.router))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new2, _ = step(new, batch)
  assert int(new2.bad_streak) == 2 and int(new2.skipped) == 2
