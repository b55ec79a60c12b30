"""Bits per byte: a tokenizer-independent held-out metric.

A mean cross-entropy of L nats per token over a text of N tokens and Y UTF-8 bytes carries L * N / ln 2 bits,
that is bpb = L / ln 2 * N / Y; models with different tokenizers compare on bpb, not on loss.
"""

from __future__ import annotations

import math
from typing import Iterable

from deepseek_jax.data.tokenizer import Tokenizer


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str], count_separators: bool = True) -> float:
  """UTF-8 bytes per token of texts as the packed stream holds them.

  Args:
    tokenizer: the tokenizer.
    texts: the documents.
    count_separators: count the EOS token that packing appends to each document (it has no bytes), so the
      ratio matches a loss averaged over packed windows.
  Returns:
    total bytes / total tokens.
  """
  n_bytes = n_tokens = 0
  for t in texts:
    n_bytes += len(t.encode("utf-8"))
    n_tokens += len(tokenizer.encode(t)) + (1 if count_separators else 0)
  if n_tokens == 0:
    raise ValueError("bytes_per_token needs at least one token; the texts are empty")
  return n_bytes / n_tokens


def bits_per_byte(loss_nats_per_token: float, bytes_per_token_ratio: float) -> float:
  """Bits per UTF-8 byte from a mean cross-entropy in nats per token.

  Args:
    loss_nats_per_token: mean cross-entropy (natural log) per predicted token.
    bytes_per_token_ratio: bytes per token of the evaluated text (`bytes_per_token`, or
      `Datasets.heldout_bytes_per_token`).
  Returns:
    loss / ln 2 / bytes_per_token.
  """
  if not bytes_per_token_ratio > 0:
    raise ValueError(f"bytes_per_token_ratio={bytes_per_token_ratio} must be > 0")
  return float(loss_nats_per_token) / math.log(2.0) / float(bytes_per_token_ratio)
