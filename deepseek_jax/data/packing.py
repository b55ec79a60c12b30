"""Packing: documents -> one token stream with EOS separators -> windows of seq_len + 1 tokens.

Each document is followed by the tokenizer's EOS id, so the model sees every document boundary. Window i is
`stream[i * seq_len : i * seq_len + seq_len + 1]`: consecutive windows share one token, so every token after the
first is a target exactly once; inputs are `window[:-1]`, targets `window[1:]`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from deepseek_jax.data.corpus import read_bytes
from deepseek_jax.data.tokenizer import ByteTokenizer, Tokenizer

_HF_BATCH_DOCS = 64   # documents per `tokenizers` batch call: parallel, bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype holding ids below vocab_size (uint16 up to 65536, else uint32)."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def pack_documents(documents: Sequence[Sequence[int] | np.ndarray], eos_id: int,
                   dtype: np.dtype | type = np.int32) -> np.ndarray:
  """Concatenates documents, each followed by `eos_id`.

  Args:
    documents: token id sequences.
    eos_id: the separator.
    dtype: dtype of the result.
  Returns:
    1-D array of length sum(len(doc) + 1).
  """
  lengths = [len(d) for d in documents]
  out = np.empty(sum(lengths) + len(lengths), dtype=dtype)
  pos = 0
  for doc, n in zip(documents, lengths):
    out[pos:pos + n] = doc
    out[pos + n] = eos_id
    pos += n + 1
  return out


@dataclasses.dataclass(frozen=True)
class TokenizedFiles:
  """The packed stream of a list of files.

  Attributes:
    tokens: 1-D token array (documents separated by EOS).
    documents: files that were used.
    skipped: files skipped as not UTF-8 text.
    text_bytes: UTF-8 bytes of the text that was tokenized.
  """
  tokens: np.ndarray
  documents: int
  skipped: tuple[str, ...]
  text_bytes: int


def tokenize_files(files: Sequence[Path], tokenizer: Tokenizer) -> TokenizedFiles:
  """Reads and packs text files (non-UTF-8 files skipped).

  The byte tokenizer maps each file's bytes with `np.frombuffer`; other tokenizers encode in batches.

  Args:
    files: text files in corpus order.
    tokenizer: the tokenizer.
  Returns:
    The packed stream and what went into it.
  """
  docs, skipped, text_bytes = [], [], 0
  pending: list[str] = []

  def flush():
    docs.extend(tokenizer.encode_documents(pending))
    pending.clear()

  for f in files:
    data = read_bytes(f)
    if data is None:
      skipped.append(str(f))
      continue
    text_bytes += len(data)
    if isinstance(tokenizer, ByteTokenizer):
      docs.append(tokenizer.encode_bytes(data))
    else:
      pending.append(data.decode("utf-8"))
      if len(pending) >= _HF_BATCH_DOCS:
        flush()
  flush()
  tokens = pack_documents(docs, tokenizer.eos_id, token_dtype(tokenizer.vocab_size))
  return TokenizedFiles(tokens=tokens, documents=len(docs), skipped=tuple(skipped), text_bytes=text_bytes)


def load_token_files(files: Sequence[Path], vocab_size: int) -> np.ndarray:
  """Concatenates pre-tokenized `.npy` files (each a 1-D integer array, used as-is: no separator added).

  Args:
    files: `.npy` files in corpus order.
    vocab_size: ids must be below this (the tokenizer's vocabulary).
  Returns:
    1-D token array.
  """
  parts = []
  for f in files:
    try:
      arr = np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise ValueError(f"cannot read token file {f}: {e}") from e
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"token file {f} holds a {arr.dtype} array of shape {arr.shape}; expected a 1-D "
                       f"integer array")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
      raise ValueError(f"token file {f} has ids in [{int(arr.min())}, {int(arr.max())}], outside the "
                       f"tokenizer's vocabulary [0, {vocab_size})")
    parts.append(arr)
  if not parts:
    return np.zeros((0,), token_dtype(vocab_size))
  return np.concatenate(parts).astype(token_dtype(vocab_size), copy=False)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows of seq_len + 1 tokens at stride seq_len in a stream of num_tokens tokens."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  return max(0, (num_tokens - 1) // seq_len)


def check_min_tokens(num_tokens: int, seq_len: int, name: str = "corpus") -> None:
  """Raises ValueError when a stream is shorter than one window of seq_len + 1 tokens."""
  if num_tokens < seq_len + 1:
    raise ValueError(f"{name} has {num_tokens} tokens, fewer than one window of seq_len + 1 = "
                     f"{seq_len + 1} tokens")


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Inputs and targets of the given windows.

  Args:
    tokens: 1-D token stream.
    window_ids: int array [N] of window indices.
    seq_len: window length minus one.
  Returns:
    {'inputs': int32 [N, seq_len], 'targets': int32 [N, seq_len]}, targets = inputs shifted left by one.
  """
  starts = np.asarray(window_ids, dtype=np.int64) * seq_len
  rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
  return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}
