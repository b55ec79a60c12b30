"""Token sampling: greedy, temperature, top-k and top-p (nucleus) filters.

A `SamplingParams` is hashable, so it is a static argument of the compiled decode loops.  The filtered
distribution is what both plain sampling and speculative sampling draw from:
1. logits / temperature (float32);
2. top-k: tokens below the k-th largest logit get -inf (ties with the k-th are kept);
3. top-p: the smallest set of most likely tokens whose probability reaches top_p is kept (the most likely
   token always is), the rest get -inf;
4. softmax of what is left.
Temperature 0 means greedy (argmax; top_k / top_p are then irrelevant).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen.

  Attributes:
    temperature: 0 for greedy decoding, else the softmax temperature (> 0).
    top_k: keep only the k most likely tokens (0: no limit).
    top_p: keep the smallest most-likely set of total probability >= top_p (1.0: no limit).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature!r} must be >= 0")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer (0: no limit)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    """Whether decoding takes the argmax."""
    return self.temperature == 0


def filter_logits(logits, params: SamplingParams):
  """Temperature-scaled float32 logits with the tokens outside top-k / top-p set to -inf.

  Args:
    logits: [..., V] raw logits.
    params: the sampling parameters (temperature > 0).
  Returns:
    [..., V] float32 filtered logits; softmax of them is the sampling distribution.
  """
  x = logits.astype(jnp.float32) / params.temperature
  vocab = x.shape[-1]
  if 0 < params.top_k < vocab:
    kth = jax.lax.top_k(x, params.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if params.top_p < 1.0:
    desc = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    # Token i (in descending order) is kept iff the mass strictly before it is below top_p: the first token
    # always is, and the kept set is the smallest reaching top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < params.top_p
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def probabilities(logits, params: SamplingParams):
  """The sampling distribution [..., V] float32 (one-hot of the argmax when greedy)."""
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filter_logits(logits, params), axis=-1)


def sample(key, logits, params: SamplingParams):
  """Draws one token per row.

  Args:
    key: a PRNG key (unused when greedy).
    logits: [..., V] logits.
    params: the sampling parameters.
  Returns:
    int32 [...] token ids.
  """
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def sample_from_probs(key, probs):
  """Draws one token per row from (unnormalized, non-negative) probabilities [..., V] -> int32 [...]."""
  logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
