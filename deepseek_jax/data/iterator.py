"""Deterministic, resumable, per-process iterators over packed token windows.

`TokenBatches` defines one endless stream of windows: epoch e visits every window once, in the order
`permutation(seed, e)`. A global batch of size B takes the next B windows of that stream (crossing into the
next epoch when one ends), so the whole position is one integer - the number of windows consumed - and the
batch size may change from call to call (a batch-size ramp) without losing determinism. Process p of P
materializes only rows [p * B/P, (p + 1) * B/P) of each global batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from deepseek_jax.data.packing import check_min_tokens, gather_windows, num_windows

_STATE_VERSION = 1


def _check_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1:
    raise ValueError(f"process_count={process_count} must be >= 1")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")


class TokenBatches:
  """Shuffled training batches of one process, resumable from `state()`.

  Steps per call of `next_batch(B)`:
    1. global stream positions c .. c + B - 1 (c = windows consumed so far); this process keeps
       c + p * B/P .. c + (p + 1) * B/P - 1;
    2. position q maps to epoch q // W and slot q % W (W windows per epoch), window
       `permutation(seed, epoch)[slot]` (numpy PCG64 seeded with (seed, epoch));
    3. rows are gathered from the token stream as int32 inputs / targets;
    4. c += B.

  Args:
    tokens: 1-D token stream (any integer dtype; a memory map is fine).
    seq_len: tokens per row.
    global_batch_size: default rows per global batch (the `next(...)` batch size).
    seed: shuffle seed.
    process_index: this process (jax.process_index()).
    process_count: processes sharing the global batch (jax.process_count()).
    state: a dict from `state()` to continue from; None starts at the beginning.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, state: dict | None = None):
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    check_min_tokens(tokens.shape[0], seq_len, "token stream")
    _check_process(process_index, process_count)
    _check_batch(global_batch_size, process_count)
    self.tokens = tokens
    self.seq_len = int(seq_len)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.num_windows = num_windows(tokens.shape[0], seq_len)
    self._consumed = 0
    self._perm_cache: dict[int, np.ndarray] = {}
    if state is not None:
      self.restore(state)

  # --------------------------------------------------------------------------------------- position
  @property
  def consumed(self) -> int:
    """Windows of the global stream consumed so far."""
    return self._consumed

  @property
  def epoch(self) -> int:
    """Epoch of the next window."""
    return self._consumed // self.num_windows

  def state(self) -> dict:
    """The position as a small JSON-serializable dict (saved with each checkpoint).

    Returns:
      {'version', 'consumed', 'seed', 'seq_len', 'num_windows'}; the last three let `restore` refuse a state
      from a different corpus or shuffle, which would silently give other batches.
    """
    return {"version": _STATE_VERSION, "consumed": self._consumed, "seed": self.seed,
            "seq_len": self.seq_len, "num_windows": self.num_windows}

  def restore(self, state: dict) -> None:
    """Continues from a position returned by `state()` (on any process count).

    Args:
      state: the dict.
    """
    try:
      version, consumed = int(state["version"]), int(state["consumed"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"data iterator state {state!r} is malformed: {e!r}") from e
    if version != _STATE_VERSION:
      raise ValueError(f"data iterator state version {version}, expected {_STATE_VERSION}")
    for key in ("seed", "seq_len", "num_windows"):
      if int(state.get(key, -1)) != getattr(self, key):
        raise ValueError(f"data iterator state has {key}={state.get(key)} but this iterator has "
                         f"{key}={getattr(self, key)}: it belongs to another corpus or run")
    if consumed < 0:
      raise ValueError(f"data iterator state has consumed={consumed} < 0")
    self._consumed = consumed

  # --------------------------------------------------------------------------------------- batches
  def permutation(self, epoch: int) -> np.ndarray:
    """Window order of an epoch (a pure function of seed and epoch)."""
    perm = self._perm_cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      # Keep the current and the next epoch only: a batch spans at most a few epochs.
      self._perm_cache = {e: p for e, p in self._perm_cache.items() if e >= epoch - 1}
      self._perm_cache[epoch] = perm
    return perm

  def window_ids(self, start: int, count: int) -> np.ndarray:
    """Window indices at global stream positions start .. start + count - 1."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, slots = np.divmod(positions, self.num_windows)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs).tolist():
      sel = epochs == e
      out[sel] = self.permutation(e)[slots[sel]]
    return out

  def next_batch(self, global_batch_size: int | None = None) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch.

    Args:
      global_batch_size: rows of the global batch; the constructor's when None. May change between calls.
    Returns:
      {'inputs': int32 [global_batch_size / process_count, seq_len], 'targets': same}.
    """
    batch = self.global_batch_size if global_batch_size is None else int(global_batch_size)
    local = _check_batch(batch, self.process_count)
    ids = self.window_ids(self._consumed + self.process_index * local, local)
    self._consumed += batch
    return gather_windows(self.tokens, ids, self.seq_len)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()


def sequential_batches(tokens: np.ndarray, seq_len: int, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1,
                       max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches: windows in stream order, full global batches only, the same on every call.

  Args:
    tokens: 1-D token stream (e.g. the held-out split).
    seq_len: tokens per row.
    global_batch_size: rows per global batch.
    process_index: this process.
    process_count: processes sharing each global batch.
    max_batches: stop after this many batches (None: all full batches).
  Returns:
    An iterator of {'inputs', 'targets'}: int32 [global_batch_size / process_count, seq_len], this process's rows.
  """
  _check_process(process_index, process_count)
  local = _check_batch(global_batch_size, process_count)
  check_min_tokens(np.shape(tokens)[0], seq_len, "evaluation token stream")
  total = num_windows(np.shape(tokens)[0], seq_len)
  n = total // global_batch_size
  if n == 0:
    raise ValueError(f"evaluation token stream has {total} windows of seq_len={seq_len}, fewer than one "
                     f"global batch of {global_batch_size}")
  if max_batches is not None:
    n = min(n, max_batches)

  # Checks above run at the call, not at the first next(): errors surface where the batches are requested.
  def batches():
    for b in range(n):
      start = b * global_batch_size + process_index * local
      yield gather_windows(tokens, np.arange(start, start + local), seq_len)
  return batches()
