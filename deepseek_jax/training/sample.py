"""Text samples from a model during training: a fixed-size full-forward loop (one compilation).

Each new token runs the whole [1, prompt + length] buffer through the model and reads the logits at the last
filled position; causal attention makes the unfilled tail irrelevant. Slow (quadratic) and simple: for
checking that a run learned something, not for serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_tokens(model, variables, prompt: list[int], length: int, *, temperature: float = 0.8,
                  rng=None) -> list[int]:
  """Continues `prompt` by `length` tokens.

  Args:
    model: the DeepSeekV3 module.
    variables: its variables.
    prompt: token ids (at least one).
    length: new tokens.
    temperature: 0 = greedy; else softmax(logits / temperature) sampling.
    rng: PRNG key for sampling.
  Returns:
    the new token ids.
  """
  if not prompt:
    raise ValueError("sample_tokens needs a non-empty prompt")
  total = len(prompt) + length
  # The buffer and key stay on the host and the variables are an argument (not a closed-over constant):
  # with a sharded (possibly multi-process) state every process runs the same jitted call on the same
  # host values and reads the same replicated token.
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt)] = np.asarray(prompt, np.int32)
  rng = jax.random.PRNGKey(0) if rng is None else rng

  @jax.jit
  def next_token(variables, buf, pos, key):
    logits = model.apply(variables, buf).logits[0]
    last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=0, keepdims=False)
    if temperature <= 0:
      return jnp.argmax(last).astype(jnp.int32)
    return jax.random.categorical(key, last / temperature).astype(jnp.int32)

  out = []
  for pos in range(len(prompt), total):
    rng, key = jax.random.split(rng)
    tok = int(next_token(variables, buf, np.int32(pos), np.asarray(jax.random.key_data(key)
                                                                   if _typed(key) else key)))
    buf[0, pos] = tok
    out.append(tok)
  return out


def _typed(key) -> bool:
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)

def sample_text(model, variables, tokenizer, prompt: str, length: int, *, temperature: float = 0.8,
                seed: int = 0) -> str:
  """Prompt + generated continuation as text.

  Args:
    model: the DeepSeekV3 module.
    variables: its variables.
    tokenizer: a deepseek_jax.data Tokenizer.
    prompt: text to continue (empty: start from the BOS token).
    length: new tokens.
    temperature: 0 = greedy.
    seed: sampling seed.
  Returns:
    The text.
  """
  ids = list(tokenizer.encode(prompt)) if prompt else [tokenizer.bos_id]
  new = sample_tokens(model, variables, ids, length, temperature=temperature,
                      rng=jax.random.PRNGKey(seed))
  return tokenizer.decode(np.asarray(ids + new))
