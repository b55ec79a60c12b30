"""MTP speculative decoding: greedy output == plain greedy, drafts == the full forward's MTP predictions,
per-row acceptance in a mixed batch, reproducible sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference import generate

from tests.inference.conftest import NEW, aligned_model, reference_greedy


def replay(seq, mtp_logits, lengths, depth):
  """(accepted drafts summed over rows, steps of the slowest row) of an exact MTP drafter on `seq`."""
  drafts = [np.asarray(jnp.argmax(m, -1)) for m in mtp_logits]   # depth k at i predicts t_{i+k+1}
  total, steps = 0, 0
  for r, p in enumerate(lengths):
    n, s = p + 1, 0
    while n - p < NEW:
      a = 0
      while a < depth and drafts[a][r, n - 2] == seq[r, n + a]:
        a += 1
      total, n, s = total + a, n + a + 1, s + 1
    steps = max(steps, s)
  return total, steps


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_plain_greedy(prompts, greedy, depth):
  model, variables = aligned_model(depth)
  ids, lengths = prompts
  out, logits, stats = generate(model, variables, ids, prompt_lengths=lengths, max_new_tokens=NEW,
                                cache_dtype=jnp.float32, speculative=True, return_logits=True,
                                return_stats=True)
  out = np.asarray(out)
  ref, full = reference_greedy(model, variables, ids, lengths, NEW + depth)
  np.testing.assert_array_equal(out, [ref[r, lengths[r]:lengths[r] + NEW] for r in range(3)])
  if depth == 1:   # same weights as the plain-greedy fixture
    np.testing.assert_array_equal(out, greedy[0])
    assert float(jnp.max(jnp.abs(logits - greedy[1]))) < 1e-5
  # Drafts agree sometimes and not other times; rows advance by different amounts.
  assert 0 < stats["acceptance_rate"] < 1, stats
  assert stats["steps"] < NEW - 1
  # The drafts are exactly the full forward's MTP predictions (the MTP caches stay consistent): replaying
  # acceptance with them gives the same counts.
  accepted, steps = replay(ref, full.mtp_logits, lengths, depth)
  assert (stats["accepted"], stats["steps"]) == (accepted, steps)


def test_speculative_sampling_reproducible(prompts):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  kw = dict(prompt_lengths=lengths, max_new_tokens=NEW, temperature=0.7, top_k=20,
            cache_dtype=jnp.float32, speculative=True, return_stats=True)
  a, sa = generate(model, variables, ids, rng=jax.random.key(1), **kw)
  b, sb = generate(model, variables, ids, rng=jax.random.key(1), **kw)
  c, _ = generate(model, variables, ids, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a, b)
  assert sa == {**sb, "prefill_s": sa["prefill_s"], "decode_s": sa["decode_s"],
                "tokens_per_s": sa["tokens_per_s"], "compile_s": sa["compile_s"]}
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.3
  assert 0 <= sa["acceptance_rate"] <= 1
