"""Sampling filters and the speculative acceptance rule against numpy float64 references and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import (SamplingParams, accept_greedy, accept_sampled, filter_logits,
                                    probabilities, sample)


def _reference_probs(logits, temperature, top_k, top_p):
  """Numpy float64: temperature, top-k, then the smallest top set of mass >= top_p."""
  out = []
  for row in np.asarray(logits, np.float64) / temperature:
    keep = np.ones_like(row, bool)
    if top_k:
      keep &= row >= np.sort(row)[::-1][top_k - 1]
    x = np.where(keep, row, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    kept = order[before < top_p]
    q = np.zeros_like(p)
    q[kept] = p[kept]
    out.append(q / q.sum())
  return np.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 12, 0.6), (1.0, 1, 1.0)])
def test_filtered_distribution_matches_numpy(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 40)) * 2.0
  params = SamplingParams(temperature, top_k, top_p)
  got = np.asarray(probabilities(logits, params))
  np.testing.assert_allclose(got, _reference_probs(logits, temperature, top_k, top_p), atol=1e-6)
  kept = np.isfinite(np.asarray(filter_logits(logits, params)))
  np.testing.assert_array_equal(kept, got > 0)


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
  logits = jnp.array([[0.0, 1.0, 2.0, 0.5, -1.0]])
  assert int(sample(None, logits, SamplingParams())[0]) == 2
  params = SamplingParams(1.0, top_k=3)
  keys = jax.random.split(jax.random.PRNGKey(1), 40000)
  draws = np.asarray(jax.vmap(lambda k: sample(k, logits[0], params))(keys))
  freq = np.bincount(draws, minlength=5) / draws.size
  expected = _reference_probs(logits, 1.0, 3, 1.0)[0]
  assert freq[0] == 0 and freq[4] == 0           # filtered out by top-3
  np.testing.assert_allclose(freq, expected, atol=0.01)


def test_bad_sampling_settings():
  with pytest.raises(ValueError, match="temperature=-1"):
    SamplingParams(-1.0)
  with pytest.raises(ValueError, match="top_p=0.0"):
    SamplingParams(1.0, top_p=0.0)
  with pytest.raises(ValueError, match="top_k=-2"):
    SamplingParams(1.0, top_k=-2)


def test_accept_greedy_longest_agreeing_prefix():
  v = 7
  target = np.array([[3, 4, 5], [3, 4, 5], [1, 2, 6]])
  logits = jax.nn.one_hot(target, v) * 5.0
  drafts = jnp.array([[3, 4], [3, 0], [0, 2]])       # all / first only / none agree
  accepted, tokens = accept_greedy(logits, drafts)
  np.testing.assert_array_equal(accepted, [2, 1, 0])
  np.testing.assert_array_equal(tokens, target)      # accepted drafts, then the target's token


def test_speculative_sampling_keeps_the_target_distribution():
  """Each emitted token, given it is emitted, follows the target p of its position (not the draft q)."""
  v, d, n = 5, 2, 200_000
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(v), size=d + 1).astype(np.float32)     # [D+1, V] targets
  q = rng.dirichlet(np.ones(v), size=d).astype(np.float32)         # [D, V] drafts
  q[0, 3] = 0.0                                                     # a token the draft never proposes
  q[0] /= q[0].sum()
  k_draft, k_accept = jax.random.split(jax.random.PRNGKey(3))
  drafts = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q)), shape=(n, d)).astype(jnp.int32)
  accepted, tokens = accept_sampled(k_accept, jnp.broadcast_to(p, (n, d + 1, v)),
                                    jnp.broadcast_to(q, (n, d, v)), drafts)
  accepted, tokens = np.asarray(accepted), np.asarray(tokens)
  for j in range(d + 1):
    reached = accepted >= j                         # token j is emitted iff the first j drafts were accepted
    freq = np.bincount(tokens[reached, j], minlength=v) / reached.sum()
    np.testing.assert_allclose(freq, p[j], atol=4 / np.sqrt(reached.sum()))
  # The first draft is accepted with probability sum_x min(p(x), q(x)).
  np.testing.assert_allclose(np.mean(accepted >= 1), np.minimum(p[0], q[0]).sum(), atol=0.005)
