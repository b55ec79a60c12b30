"""Plain generation: cached decoding == full forward, mixed prompt lengths, EOS, streaming, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.inference import generate

from tests.inference.conftest import NEW, aligned_model, full_forward, reference_greedy


def full_logits(model, variables, ids, lengths, generated):
  """Teacher-forced full forward (no cache) of each row's prompt + generated tokens -> [B, NEW, V]."""
  rows = [np.concatenate([ids[r, :lengths[r]], generated[r]]) for r in range(len(lengths))]
  width = len(ids[0]) + NEW
  seq = np.stack([np.pad(r, (0, width - len(r))) for r in rows])   # causal: the right padding is unseen
  logits = full_forward(model)(variables, jnp.asarray(seq)).logits
  return jnp.stack([logits[r, lengths[r] - 1:lengths[r] - 1 + NEW] for r in range(len(lengths))])


def test_cached_decode_logits_equal_full_forward(prompts, greedy):
  model, variables = aligned_model(1)
  out, logits, stats = greedy
  full = full_logits(model, variables, *prompts, out)
  err = float(jnp.max(jnp.abs(logits - full)))
  assert err < 1e-4, err
  np.testing.assert_array_equal(out, np.asarray(jnp.argmax(full, -1)))   # greedy = argmax at every step
  ids, lengths = prompts
  seq, _ = reference_greedy(model, variables, ids, lengths, NEW)
  np.testing.assert_array_equal(out, [seq[r, lengths[r]:lengths[r] + NEW] for r in range(3)])
  assert stats["steps"] == NEW - 1 and stats["new_tokens"] == 3 * NEW


def test_mixed_prompt_lengths_equal_a_row_alone(prompts, greedy):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  r = 1   # the shortest row, unpadded and alone
  alone, logits = generate(model, variables, ids[r:r + 1, :lengths[r]], max_new_tokens=NEW,
                           cache_dtype=jnp.float32, return_logits=True)
  np.testing.assert_array_equal(np.asarray(alone)[0], greedy[0][r])
  assert float(jnp.max(jnp.abs(logits[0] - greedy[1][r]))) < 1e-5


def test_bf16_cache_is_close(prompts, greedy):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  _, logits = generate(model, variables, ids, prompt_lengths=lengths, max_new_tokens=NEW,
                       cache_dtype=jnp.bfloat16, return_logits=True)
  # Only the first step is teacher-forced identically (later tokens may differ); prefill already reads the
  # bf16 cache: a small, nonzero difference.
  err = float(jnp.max(jnp.abs(logits[:, 0] - greedy[1][:, 0])))
  assert 0 < err < 0.05, err


def test_eos_stops_a_row_and_pads(prompts, greedy):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  out = greedy[0]
  eos = int(out[0, 4])
  got, logits = generate(model, variables, ids, prompt_lengths=lengths, max_new_tokens=NEW,
                         cache_dtype=jnp.float32, eos_id=eos, pad_id=0, return_logits=True)
  got = np.asarray(got)
  stops = []
  for r in range(3):
    hits = np.flatnonzero(out[r] == eos)
    stop = hits[0] + 1 if hits.size else NEW
    stops.append(stop)
    np.testing.assert_array_equal(got[r, :stop], out[r, :stop])
    np.testing.assert_array_equal(got[r, stop:], 0)
    np.testing.assert_allclose(logits[r, :stop], greedy[1][r, :stop], atol=1e-6)
    assert float(jnp.sum(jnp.abs(logits[r, stop:]))) == 0.0
  assert stops[0] <= 5


def test_streaming_chunks_equal_one_call(prompts, greedy):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  pieces = []
  out, _ = generate(model, variables, ids, prompt_lengths=lengths, max_new_tokens=NEW,
                    cache_dtype=jnp.float32, on_tokens=pieces.append, chunk_steps=4, return_logits=True)
  assert len(pieces) == 1 + -(-(NEW - 1) // 4)         # after prefill, then every 4 steps
  assert [len(p) for p in pieces[0]] == [1, 1, 1]
  streamed = np.stack([np.concatenate([p[r] for p in pieces]) for r in range(3)])
  np.testing.assert_array_equal(streamed, greedy[0])
  np.testing.assert_array_equal(np.asarray(out), greedy[0])


def test_sampling_reproducible_with_a_fixed_key(prompts):
  model, variables = aligned_model(1)
  ids, lengths = prompts
  kw = dict(prompt_lengths=lengths, max_new_tokens=NEW, temperature=0.8, top_k=40, top_p=0.9,
            cache_dtype=jnp.float32)
  a = np.asarray(generate(model, variables, ids, rng=jax.random.key(3), **kw))
  b = np.asarray(generate(model, variables, ids, rng=jax.random.key(3), **kw))
  c = np.asarray(generate(model, variables, ids, rng=jax.random.key(4), **kw))
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.3
  assert a.min() >= 0 and a.max() < model.cfg.vocab_size


def test_errors_name_the_problem():
  model, variables = aligned_model(1)
  cfg = model.cfg
  with pytest.raises(ValueError, match="empty prompt"):
    generate(model, variables, np.zeros((2, 0), np.int32), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"empty prompt \(row 1 has 0 tokens\)"):
    generate(model, variables, np.ones((2, 3), np.int32), prompt_lengths=[3, 0], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 1015 = 1025 exceeds "
                                       r"max_position_embeddings=1024"):
    generate(model, variables, np.ones((1, 10), np.int32), max_new_tokens=cfg.max_position_embeddings - 9)
  with pytest.raises(ValueError, match=r"prompt_ids\[0, 2\]=512 is outside the vocabulary \[0, 512\)"):
    generate(model, variables, np.array([[1, 2, 512, 4]]), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"prompt_ids\[1, 0\]=-3 is outside the vocabulary"):
    generate(model, variables, np.array([[1, 2], [-3, 4]]), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"prompt_lengths\[0\]=5 exceeds the padded prompt length 2"):
    generate(model, variables, np.array([[1, 2]]), prompt_lengths=[5], max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    generate(model, variables, np.array([[1, 2]]), max_new_tokens=0)
  with pytest.raises(ValueError, match="eos_id=600 is outside the vocabulary"):
    generate(model, variables, np.array([[1, 2]]), max_new_tokens=2, eos_id=600)
  with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
    generate(dsj.DeepSeekV3(cfg.replace(num_nextn_predict_layers=0)), variables, np.array([[1, 2]]),
             max_new_tokens=2, speculative=True)
