"""Tiny fp32 models for the inference tests, with MTP modules that agree with the main model part of the time.

A randomly initialized MTP module almost never predicts what the main model will say, so speculative
decoding would reject every draft.  Setting eh_proj to [I; small noise] makes depth k pass the embedding of
t_{i+k} straight through, so its head sees roughly what the main model sees one position later: drafts are
then accepted some of the time and rejected the rest, which exercises both branches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj

PROMPT_LENGTHS = (8, 3, 5)


def random_variables(model, seed: int = 0):
  """Random variables in `model.init`'s structure, drawn in numpy: N(0, initializer_range) weights, unit norm
  scales, N(0, 0.05) router biases (as after training).  Compiling `model.init` costs far more than the
  tests that use it."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "e_score_correction_bias" in name:
      return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)
    if leaf.ndim == 1 and "norm" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(model.cfg.initializer_range * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def aligned_model(depth: int = 1, seed: int = 0):
  """(model, variables): the tiny preset cut to 2 layers (one dense, one MoE; compile time dominates these
  tests), with `depth` MTP depths whose eh_proj is [I; 0.1 noise]."""
  cfg = dsj.ModelConfig.preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=depth)
  model = dsj.DeepSeekV3(cfg)
  variables = random_variables(model, seed)
  d = cfg.hidden_size
  params = dict(variables["params"])
  for k in range(depth):
    noise = 0.1 * jax.random.normal(jax.random.PRNGKey(100 + k), (d, d)) / np.sqrt(d)
    layer = dict(params[f"mtp_{k}"])
    layer["eh_proj"] = {"kernel": jnp.concatenate([jnp.eye(d), noise], axis=0)}
    params[f"mtp_{k}"] = layer
  return model, {"params": params, "router": variables["router"]}


@pytest.fixture(scope="session")
def prompts():
  """Right-padded prompts [3, 8] (padding = 0) and their lengths."""
  cfg = dsj.ModelConfig.preset("tiny")
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(11), (3, 8), 2, cfg.vocab_size))
  lengths = np.asarray(PROMPT_LENGTHS)
  ids = np.where(np.arange(8)[None] < lengths[:, None], ids, 0)
  return ids, lengths


@functools.lru_cache(maxsize=None)
def full_forward(model):
  """jit(model.apply) -> ModelOutput, one compilation per model and shape."""
  return jax.jit(model.apply)


NEW = 12


def reference_greedy(model, variables, ids, lengths, new):
  """Greedy continuation by repeated full forward passes without a cache (one fixed width, so one
  compilation): returns the [B, W] token array (prompt, `new` tokens, zero padding) and its ModelOutput."""
  b = len(lengths)
  width = ids.shape[1] + new
  seq = np.zeros((b, width), np.int32)
  seq[:, :ids.shape[1]] = np.where(np.arange(ids.shape[1])[None] < lengths[:, None], ids, 0)
  rows = np.arange(b)
  for i in range(new):
    logits = full_forward(model)(variables, jnp.asarray(seq)).logits
    seq[rows, lengths + i] = np.asarray(jnp.argmax(logits[rows, lengths + i - 1], -1))
  return seq, full_forward(model)(variables, jnp.asarray(seq))


@pytest.fixture(scope="session")
def greedy(prompts):
  """Plain greedy decoding of the mixed-length batch with the depth-1 model: (ids, logits, stats)."""
  from deepseek_jax.inference import generate  # pylint: disable=g-import-not-at-top
  model, variables = aligned_model(1)
  ids, lengths = prompts
  out, logits, stats = generate(model, variables, ids, prompt_lengths=lengths, max_new_tokens=NEW,
                                cache_dtype=jnp.float32, return_logits=True, return_stats=True)
  return np.asarray(out), logits, stats
