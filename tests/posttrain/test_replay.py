"""Routing replay: the generator's recorded experts are reproduced exactly by the training forward, whose
log-probs then equal the sampler's; without replay, perturbed weights route some tokens differently.  Per-layer
modules and a scanned run of MoE layers (its routing carries the layer axis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import generate
from deepseek_jax.posttrain import expert_mismatch, experts_of, forward_log_probs, replay_collection

NEW = 6


@pytest.fixture(scope="module", params=["micro", "micro_scan"])
def policy(request):
  return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def sampled(policy):
  model, variables = policy
  prompts = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 0, 0, 0]])
  lengths = np.array([5, 3, 2])
  ids, logits, routing = generate(model, variables, prompts, prompt_lengths=lengths, max_new_tokens=NEW,
                                  temperature=1.0, rng=3, return_logits=True, return_routing=True)
  ids = np.asarray(ids)
  s = prompts.shape[1] + NEW
  tokens = np.zeros((3, s), np.int32)
  for i in range(3):
    tokens[i, :lengths[i]] = prompts[i, :lengths[i]]
    tokens[i, lengths[i]:lengths[i] + NEW] = ids[i]
  fed = (np.arange(s - 1)[None] < (lengths + NEW - 1)[:, None]).astype(np.float32)
  return tokens, lengths, np.asarray(logits), routing, fed


def test_replay_reproduces_experts_and_log_probs(policy, sampled):
  model, variables = policy
  tokens, lengths, logits, routing, fed = sampled
  s = tokens.shape[1]
  assert len(experts_of(routing)) == 1                      # the one MoE layer, or the scanned run of two
  if model.cfg.scan_layers:
    assert experts_of(routing)[0].shape[2:] == (2, model.cfg.num_experts_per_tok)
  for weights in (False, True):
    replay = replay_collection(routing, s - 1, weights=weights)
    logp, _, rec = forward_log_probs(model, variables, jnp.asarray(tokens), replay=replay, record=True)
    for got, want in zip(experts_of(rec), experts_of(routing)):
      got = np.asarray(got).reshape(3, s - 1, -1)
      want = np.asarray(want)[:, :s - 1].reshape(3, s - 1, -1)
      assert np.array_equal(got[fed > 0], want[fed > 0])
    if weights:
      got_w = np.asarray(jax.tree.leaves(rec)[1]).reshape(3, s - 1, -1)
      want_w = np.asarray(jax.tree.leaves(routing)[1])[:, :s - 1].reshape(3, s - 1, -1)
      np.testing.assert_array_equal(got_w[fed > 0], want_w[fed > 0])
    assert float(expert_mismatch(rec, routing, jnp.asarray(fed))) == 0.0
    sampler = jax.nn.log_softmax(logits, axis=-1)          # [B, NEW, V]: new token j from logits j
    for i in range(3):
      for j in range(NEW):
        t = lengths[i] + j - 1                              # target position of new token j
        want = sampler[i, j, tokens[i, t + 1]]
        np.testing.assert_allclose(float(logp[i, t]), want, rtol=0, atol=2e-5)


def test_without_replay_the_routing_drifts(policy, sampled):
  model, variables = policy
  tokens, _, _, routing, fed = sampled
  s = tokens.shape[1]
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape)
      if "gate" in jax.tree_util.keystr(p) else x, variables)
  _, _, free = forward_log_probs(model, moved, jnp.asarray(tokens), record=True)
  k = model.cfg.num_experts_per_tok
  got = np.sort(np.asarray(experts_of(free)[0]).reshape(3, s - 1, -1, k), -1)    # [B, S, layers, K]
  want = np.sort(np.asarray(experts_of(routing)[0])[:, :s - 1].reshape(3, s - 1, -1, k), -1)
  differs = (got != want).any(-1)[fed > 0]
  assert 0 < differs.mean() < 1
  assert float(expert_mismatch(free, routing, jnp.asarray(fed))) == pytest.approx(differs.mean(), abs=1e-7)
  _, _, held = forward_log_probs(model, moved, jnp.asarray(tokens), replay=replay_collection(routing, s - 1),
                                 record=True)
  assert float(expert_mismatch(held, routing, jnp.asarray(fed))) == 0.0
