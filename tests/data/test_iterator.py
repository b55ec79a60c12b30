"""The batch iterator: determinism, resume from state(), per-process shards, batch-size ramps, errors."""

import json

import numpy as np
import pytest

from deepseek_jax.data import TokenBatches, gather_windows, sequential_batches

SEQ = 4


def _stream(n=203):
  return (np.arange(n) * 7 % 251).astype(np.uint16)


def _take(it, sizes):
  return [it.next_batch(b) for b in sizes]


def _window_index(stream, row):
  """Which window a row is, found by brute force over all window starts."""
  n = (len(stream) - 1) // SEQ
  matches = [i for i in range(n) if np.array_equal(stream[i * SEQ:i * SEQ + SEQ].astype(np.int32), row)]
  assert len(matches) == 1
  return matches[0]


def test_each_epoch_visits_every_window_once():
  stream = _stream()
  it = TokenBatches(stream, SEQ, global_batch_size=10, seed=3)
  n = it.num_windows
  assert n == 50
  rows = np.concatenate([b["inputs"] for b in _take(it, [10] * 10)])  # two epochs
  ids = [_window_index(stream, r) for r in rows]
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert ids[:n] != ids[n:]  # epochs are shuffled differently
  assert ids[:n] != list(range(n))
  for b in _take(TokenBatches(stream, SEQ, 10, seed=3), [10]):
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_same_seed_same_stream_other_seed_differs():
  a = _take(TokenBatches(_stream(), SEQ, 8, seed=1), [8] * 5)
  b = _take(TokenBatches(_stream(), SEQ, 8, seed=1), [8] * 5)
  c = _take(TokenBatches(_stream(), SEQ, 8, seed=2), [8] * 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_resume_mid_epoch_equals_uninterrupted():
  sizes = [6, 6, 12, 12, 18, 24, 24, 6]   # a batch-size ramp, crossing epoch boundaries (50 windows)
  full = _take(TokenBatches(_stream(), SEQ, 6, seed=7), sizes)
  first = TokenBatches(_stream(), SEQ, 6, seed=7)
  _take(first, sizes[:3])
  state = json.loads(json.dumps(first.state()))  # as saved with a checkpoint
  assert state["consumed"] == 24 and first.epoch == 0
  resumed = TokenBatches(_stream(), SEQ, 6, seed=7, state=state)
  for want, got in zip(full[3:], _take(resumed, sizes[3:])):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
    np.testing.assert_array_equal(want["targets"], got["targets"])
  # Iterating with next() uses the constructor's batch size.
  it = TokenBatches(_stream(), SEQ, 6, seed=7)
  np.testing.assert_array_equal(next(iter(it))["inputs"], full[0]["inputs"])


def test_process_shards_concatenate_to_the_global_batch():
  sizes = [4, 8, 8, 16, 30]
  single = _take(TokenBatches(_stream(), SEQ, 4, seed=5), sizes)
  shards = [_take(TokenBatches(_stream(), SEQ, 4, seed=5, process_index=p, process_count=2), sizes)
            for p in range(2)]
  for step, want in enumerate(single):
    assert shards[0][step]["inputs"].shape == (sizes[step] // 2, SEQ)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([shards[0][step][key], shards[1][step][key]]), want[key])
  # A state saved by one process count resumes on another.
  two = TokenBatches(_stream(), SEQ, 4, seed=5, process_index=1, process_count=2)
  _take(two, sizes[:3])
  one = TokenBatches(_stream(), SEQ, 4, seed=5, state=two.state())
  np.testing.assert_array_equal(one.next_batch(16)["inputs"], single[3]["inputs"])


def test_sequential_batches_in_order_and_sharded():
  stream = _stream()
  batches = list(sequential_batches(stream, SEQ, 8))
  assert len(batches) == 50 // 8
  ref = gather_windows(stream, np.arange(48), SEQ)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches]), ref["inputs"])
  halves = [list(sequential_batches(stream, SEQ, 8, p, 2, max_batches=2)) for p in range(2)]
  for s in range(2):
    np.testing.assert_array_equal(np.concatenate([halves[0][s]["targets"], halves[1][s]["targets"]]),
                                  batches[s]["targets"])
  with pytest.raises(ValueError, match="50 windows of seq_len=4, fewer than one global batch of 64"):
    sequential_batches(stream, SEQ, 64)


def test_iterator_errors():
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    TokenBatches(_stream(), SEQ, 6, process_count=4)
  it = TokenBatches(_stream(), SEQ, 4, process_count=2)
  with pytest.raises(ValueError, match="global_batch_size=5 is not divisible by process_count=2"):
    it.next_batch(5)
  with pytest.raises(ValueError, match=r"has 4 tokens, fewer than one window of seq_len \+ 1 = 5"):
    TokenBatches(np.arange(4), SEQ, 2)
  with pytest.raises(ValueError, match=r"process_index=2 is outside \[0, process_count=2\)"):
    TokenBatches(_stream(), SEQ, 4, process_index=2, process_count=2)
  state = TokenBatches(_stream(), SEQ, 4, seed=1).state()
  with pytest.raises(ValueError, match="state has seed=1 but this iterator has seed=2"):
    TokenBatches(_stream(), SEQ, 4, seed=2, state=state)
  with pytest.raises(ValueError, match="state has num_windows=50 but this iterator has num_windows=25"):
    TokenBatches(_stream(103), SEQ, 4, seed=1, state=state)
  with pytest.raises(ValueError, match="malformed"):
    TokenBatches(_stream(), SEQ, 4, state={"consumed": 3})
