"""The static settings of a decode loop and the per-step bookkeeping shared by plain and speculative decoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference.cache import row_slice, row_update
from deepseek_jax.inference.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """The static part of a decode loop (hashable: a compile-time constant).

  Attributes:
    model: the DeepSeekV3 module.
    sampling: how tokens are chosen.
    max_new_tokens: tokens generated per row.
    speculative: verify MTP drafts each step instead of decoding one token.
    keep_logits: also keep the logits every new token was chosen from.
    record_routing: also keep every token's routed experts and gate weights (plain decoding).
  """
  model: Any
  sampling: SamplingParams
  max_new_tokens: int
  speculative: bool = False
  keep_logits: bool = False
  record_routing: bool = False

  @property
  def cfg(self) -> ModelConfig:
    return self.model.cfg

  @property
  def depth(self) -> int:
    """Drafted tokens per speculative step (the MTP depth), 0 for plain decoding."""
    return self.cfg.num_nextn_predict_layers if self.speculative else 0


def step_key(key, step):
  """The PRNG key of loop step `step` (0 is the prefill): independent of how the loop is chunked."""
  return jax.random.fold_in(key, step)


def update_done(settings: DecodeSettings, eos_id, done, active, window, num_new, n_new, lengths):
  """Rows that finished: enough tokens, or an EOS among the `num_new` [B] tokens of `window` [B, W].

  eos_id is a traced int32 scalar (-1: none), so one executable serves every end-of-sequence id."""
  j = jnp.arange(window.shape[1])[None]
  hit = jnp.any((window == eos_id) & (j < num_new[:, None]), axis=1) & (eos_id >= 0)
  return done | (active & hit) | (n_new - lengths >= settings.max_new_tokens)


def init_logits(settings: DecodeSettings, first_logits):
  """The [B, max_new_tokens + D + 1, V] float32 logits buffer with the first token's logits at index 0."""
  b, v = first_logits.shape
  buf = jnp.zeros((b, settings.max_new_tokens + settings.depth + 1, v), jnp.float32)
  return buf.at[:, 0].set(first_logits.astype(jnp.float32))


def store_logits(state, logits, active):
  """state['logits'] with logits [B, W, V] written for active rows at new-token index n - lengths on.

  (Finished rows may sit past the buffer's end; dynamic slicing clamps both the read and the write to the
  same place, so they write back what they read.)"""
  at = state["n"] - state["lengths"]
  old = row_slice(state["logits"], at, logits.shape[1])
  return row_update(state["logits"], jnp.where(active[:, None, None], logits, old), at)
