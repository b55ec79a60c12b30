"""Autoregressive generation over the latent KV cache.

Steps of `generate`:
1. Validate the prompts (non-empty, ids inside the vocabulary, prompt + new tokens inside
   max_position_embeddings) and right-pad them into one [B, P] batch with per-row lengths.
2. Prefill: one call of the main model over the padded prompts through the naive (training-path) attention,
   writing every prompt latent into the cache; each row's first new token comes from the logits at its own
   last prompt position.  Padding latents land past a row's length and are overwritten before any query can
   see them (a query attends to slots <= its own).
3. Decode: one compiled `jax.lax.while_loop`; each step feeds every row's last token at its own cache slot
   (cache_start = tokens known - 1) through the absorbed attention and appends the next token.  Rows that
   reach max_new_tokens or emit eos_id stop advancing; the loop ends when all have.  With `speculative`, each
   step instead verifies the MTP drafts (`deepseek_jax.inference.speculative`).
4. The new tokens of each row are cut from its token buffer; after an EOS the row is padded.

All state (cache, token buffer, per-row counters) lives on device; the loop is compiled once per shape and
static setting (compiled executables are cached), and `on_tokens` streaming runs the same executable in
chunks of `chunk_steps` loop iterations.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference import speculative as spec
from deepseek_jax.inference.cache import buffer_lengths, row_slice, row_update
from deepseek_jax.inference.sampling import SamplingParams, sample
from deepseek_jax.inference.settings import (DecodeSettings, init_logits, step_key, store_logits,
                                             update_done)
from deepseek_jax.model import DeepSeekV3, init_cache
from deepseek_jax.ops import impls


# ------------------------------------------------------------------------------------------ plain decoding
def plain_prefill(settings: DecodeSettings, cache_dtype, variables, tokens, lengths, key, eos_id):
  """Prefill for plain decoding.

  Args:
    settings: static settings.
    cache_dtype: dtype of the latent cache (static).
    variables: model variables.
    tokens: int32 [B, P] right-padded prompts (padding holds valid ids).
    lengths: int32 [B] prompt lengths (1..P).
    key: PRNG key.
    eos_id: int32 scalar end-of-sequence id (-1: none).
  Returns:
    The decode state: tokens [B, L] buffer (prompt, then new tokens), n [B] tokens known, lengths,
    done [B], step (loop iterations so far), key, eos_id, cache (and logits with keep_logits).
  """
  model, cfg = settings.model, settings.cfg
  b, p = tokens.shape
  cache_len, tok_len = buffer_lengths(p, settings.max_new_tokens, 0)
  cache = init_cache(cfg, b, cache_len, cache_dtype)
  zeros = jnp.zeros((b,), jnp.int32)
  (_, logits, _, layers), routing = _apply_main(settings, variables, tokens, cache["layers"], zeros, False)
  first_logits = row_slice(logits, lengths - 1, 1)[:, 0]
  first = sample(step_key(key, 0), first_logits, settings.sampling)
  buf = jnp.zeros((b, tok_len), jnp.int32).at[:, :p].set(tokens)
  buf = row_update(buf, first[:, None], lengths)
  n = lengths + 1
  done = update_done(settings, eos_id, jnp.zeros((b,), bool), jnp.ones((b,), bool), first[:, None],
                     jnp.ones((b,), jnp.int32), n, lengths)
  state = {"tokens": buf, "n": n, "lengths": lengths, "done": done, "step": jnp.zeros((), jnp.int32),
           "key": key, "eos_id": eos_id, "cache": {"layers": layers, "mtp": cache["mtp"]}}
  if settings.keep_logits:
    state["logits"] = init_logits(settings, first_logits)
  if settings.record_routing:
    state["routing"] = jax.tree.map(
        lambda r: jnp.zeros((b, tok_len) + r.shape[2:], r.dtype).at[:, :p].set(r), routing)
  return state


def plain_step(settings: DecodeSettings, variables, state):
  """One decode step: every row feeds its last token at slot n - 1 (absorbed attention) and appends one."""
  model = settings.model
  n, active = state["n"], ~state["done"]
  last = row_slice(state["tokens"], n - 1, 1)
  (_, logits, _, layers), routing = _apply_main(settings, variables, last, state["cache"]["layers"], n - 1,
                                                True)
  step = state["step"] + 1
  nxt = sample(step_key(state["key"], step), logits[:, 0], settings.sampling)
  old = row_slice(state["tokens"], n, 1)[:, 0]
  buf = row_update(state["tokens"], jnp.where(active, nxt, old)[:, None], n)
  n_new = n + active.astype(jnp.int32)
  done = update_done(settings, state["eos_id"], state["done"], active, nxt[:, None],
                     active.astype(jnp.int32), n_new, state["lengths"])
  new = dict(state, tokens=buf, n=n_new, done=done, step=step,
             cache={"layers": layers, "mtp": state["cache"]["mtp"]})
  if settings.keep_logits:
    new["logits"] = store_logits(state, logits, active)
  if settings.record_routing:
    new["routing"] = jax.tree.map(
        lambda buf, r: row_update(buf, jnp.where(active.reshape((-1,) + (1,) * (r.ndim - 1)), r,
                                                 row_slice(buf, n - 1, 1)), n - 1),
        state["routing"], routing)
  return new


# ------------------------------------------------------------------------------------------ routing record
def _apply_main(settings: DecodeSettings, variables, tokens, cache, cache_start, absorbed: bool):
  """The main model over tokens [B, S] with the cache; returns (main's outputs, routing or None).

  With settings.record_routing the routing is {MoE layer path: {'experts' int32 [B, S, K], 'weights'
  float32 [B, S, K]}} (the model's 'routing' collection; a scanned run's leaves [B, S, L, K]), else None."""
  model = settings.model
  if not settings.record_routing:
    return model.apply(variables, tokens, None, cache=cache, cache_start=cache_start, absorbed=absorbed,
                       method=DeepSeekV3.main), None
  out, rec = model.apply(variables, tokens, None, cache=cache, cache_start=cache_start, absorbed=absorbed,
                         method=DeepSeekV3.main, mutable=["routing"])
  return out, routing_rows(rec.get("routing", {}), *tokens.shape)


def routing_rows(routing, b: int, s: int):
  """A forward's 'routing' collection, batch first: per-layer leaves [B * S, K] -> [B, S, K]; a scanned run's
  [L, B * S, K] -> [B, S, L, K]."""
  def one(r):
    if r.ndim == 2:
      return r.reshape((b, s) + r.shape[1:])
    return jnp.moveaxis(r.reshape((r.shape[0], b, s) + r.shape[2:]), 0, 2)
  return jax.tree.map(one, routing)


def decode_loop(settings: DecodeSettings, variables, state, stop_step):
  """Runs decode steps while a row is unfinished and state['step'] < stop_step (a traced int32)."""
  step_fn = spec.speculative_step if settings.speculative else plain_step

  def cond(s):
    return jnp.any(~s["done"]) & (s["step"] < stop_step)

  return jax.lax.while_loop(cond, lambda s: step_fn(settings, variables, s), state)


# ------------------------------------------------------------------------------------------ compilation
_COMPILED: dict = {}
_MAX_COMPILED = 32


def _signature(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                        for x in leaves)


def _compiled(fn, static, args, donate=()):
  """An ahead-of-time compiled fn(*static, *args), cached per static values and argument signature.

  Returns (executable, seconds spent compiling now)."""
  key = (fn, static, _signature(args))
  if key not in _COMPILED:
    if len(_COMPILED) >= _MAX_COMPILED:   # drop the oldest executable
      _COMPILED.pop(next(iter(_COMPILED)))
    t0 = time.perf_counter()
    jitted = jax.jit(lambda *a: fn(*static, *a),
                     donate_argnums=donate if jax.default_backend() != "cpu" else ())
    _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key], time.perf_counter() - t0
  return _COMPILED[key], 0.0


# ------------------------------------------------------------------------------------------ validation
def prepare_prompts(cfg: ModelConfig, prompt_ids, prompt_lengths, max_new_tokens: int):
  """Validates prompts and returns (tokens int32 [B, P] with padding zeroed, lengths int32 [B]).

  Raises:
    ValueError: empty prompt, ids outside [0, vocab_size), bad lengths, or a prompt plus max_new_tokens
      beyond max_position_embeddings.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  ids = np.asarray(prompt_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2:
    raise ValueError(f"prompt_ids must be [batch, seq] (or one [seq] prompt), got shape {ids.shape}")
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"prompt_ids must hold integer token ids, got dtype {ids.dtype}")
  b, p = ids.shape
  if b == 0:
    raise ValueError("prompt_ids has batch size 0: nothing to generate")
  if prompt_lengths is None:
    lengths = np.full((b,), p, np.int64)
  else:
    lengths = np.asarray(prompt_lengths).reshape(-1)
    if lengths.shape != (b,):
      raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for a batch of {b} prompts")
    if np.any(lengths > p):
      row = int(np.argmax(lengths > p))
      raise ValueError(f"prompt_lengths[{row}]={int(lengths[row])} exceeds the padded prompt length {p}")
  if p == 0 or np.any(lengths < 1):
    row = 0 if p == 0 else int(np.argmax(lengths < 1))
    raise ValueError(f"empty prompt (row {row} has {0 if p == 0 else int(lengths[row])} tokens): "
                     "generation needs at least one prompt token")
  valid = np.arange(p)[None] < lengths[:, None]
  bad = valid & ((ids < 0) | (ids >= cfg.vocab_size))
  if np.any(bad):
    r, c = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt_ids[{r}, {c}]={int(ids[r, c])} is outside the vocabulary "
                     f"[0, {cfg.vocab_size}) ({int(bad.sum())} such ids)")
  longest = int(lengths.max())
  if longest + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
                     f"{longest + max_new_tokens} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  tokens = np.where(valid, ids, 0).astype(np.int32)
  return tokens, lengths.astype(np.int32)


def _finalize(buf, n, lengths, max_new_tokens, eos_id, pad_id):
  """[B, max_new_tokens] new ids (host numpy) and per-row counts, padded after an EOS or early stop."""
  b = buf.shape[0]
  idx = lengths[:, None] + np.arange(max_new_tokens)[None]
  out = np.take_along_axis(buf, np.minimum(idx, buf.shape[1] - 1), axis=1)
  count = np.minimum(n - lengths, max_new_tokens)
  if eos_id >= 0:
    is_eos = (out == eos_id) & (np.arange(max_new_tokens)[None] < count[:, None])
    first = np.where(is_eos.any(1), is_eos.argmax(1) + 1, max_new_tokens)
    count = np.minimum(count, first)
  out = np.where(np.arange(max_new_tokens)[None] < count[:, None], out, pad_id)
  return out.reshape(b, max_new_tokens), count


# ------------------------------------------------------------------------------------------ public API
def generate(model: DeepSeekV3, variables, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, rng=None, speculative: bool = False,
             eos_id: Optional[int] = None, pad_id: Optional[int] = None,
             prompt_lengths: Optional[Sequence[int]] = None, cache_dtype=None,
             return_stats: bool = False, return_logits: bool = False, return_routing: bool = False,
             on_tokens: Optional[Callable[[list], None]] = None, chunk_steps: int = 16):
  """Generates max_new_tokens tokens per prompt row.

  Args:
    model: a DeepSeekV3 module.
    variables: its variables (as `model.init` or `deepseek_jax.interop.hf.load` return them).
    prompt_ids: int [B, P] prompts, right-padded when rows differ in length (or one [P] prompt).
    max_new_tokens: new tokens per row.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among the k most likely tokens (0: all).
    top_p: nucleus sampling mass (1.0: all).
    rng: PRNG key (or an int seed) for sampling, default key 0; a fixed key reproduces the output.
    speculative: draft with the MTP depths and verify them in one main-model step (needs
      num_nextn_predict_layers >= 1); greedy output equals plain greedy output, sampling keeps the
      target distribution.
    eos_id: a row stops after emitting this id (None: never stops early).
    pad_id: fills a row after its EOS (default eos_id, else 0).
    prompt_lengths: int [B] valid length of each right-padded row (default: all P).
    cache_dtype: dtype of the latent cache (default: the model's compute dtype `cfg.dtype`).
    return_stats: also return a dict of statistics.
    return_logits: also return float32 [B, max_new_tokens, V] logits: entry i is the model's (unfiltered)
      next-token logits from which new token i was chosen (zeros past a row's end).
    return_routing: also return the routing every token took (plain decoding): a tree
      {MoE layer path: {'experts' int32 [B, P + max_new_tokens, K], 'weights' float32 [...]}} (a scanned
      run of layers: one path, leaves [B, P + max_new_tokens, L, K]) whose
      position t of row b is token t of that row's own sequence (its prompt_lengths[b] prompt tokens, then
      its new tokens); positions never fed to the model (its last token, padding) hold no meaning.  The
      model's 'replay' collection takes the same tree (`deepseek_jax.posttrain.replay`).
    on_tokens: streaming callback; called after prefill and after every `chunk_steps` loop iterations with
      a list (one per row) of int numpy arrays holding the tokens that row produced since the last call.
    chunk_steps: loop iterations per compiled call when streaming.
  Returns:
    int32 [B, max_new_tokens] new token ids; with return_logits, return_routing and/or return_stats, the
    tuple (ids, logits, routing, stats) without the parts not asked for.  stats has `steps` (loop iterations),
    `new_tokens` (total valid new tokens), `prefill_s`, `decode_s`, `compile_s`, `tokens_per_s` (new tokens
    / (prefill_s + decode_s), compilation excluded), `tokens_per_step` (tokens a row gains per loop
    iteration), and with speculative decoding `acceptance_rate` (accepted / proposed drafts over all rows
    and steps), `accepted` and `proposed`.
  Raises:
    ValueError: for an empty prompt, ids outside the vocabulary, a prompt + max_new_tokens beyond
      max_position_embeddings, or bad sampling settings.
  """
  model = model.clone(cfg=impls.resolve_config(model.cfg))   # the implementations, once (ambient mesh)
  cfg = model.cfg
  sampling = SamplingParams(float(temperature), int(top_k), float(top_p))
  if speculative and cfg.num_nextn_predict_layers < 1:
    raise ValueError("speculative=True needs MTP modules, but num_nextn_predict_layers="
                     f"{cfg.num_nextn_predict_layers}")
  if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
    raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
  if chunk_steps < 1:
    raise ValueError(f"chunk_steps={chunk_steps} must be positive")
  if return_routing and speculative:
    raise ValueError("return_routing=True records plain decoding only; pass speculative=False")
  tokens, lengths = prepare_prompts(cfg, prompt_ids, prompt_lengths, max_new_tokens)
  eos = -1 if eos_id is None else int(eos_id)
  pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
  settings = DecodeSettings(model, sampling, int(max_new_tokens), bool(speculative), bool(return_logits),
                            bool(return_routing))
  cache_dtype = jnp.dtype(cfg.dtype if cache_dtype is None else cache_dtype)
  rng = 0 if rng is None else rng
  key = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  prefill_fn = spec.speculative_prefill if speculative else plain_prefill
  args = (variables, jnp.asarray(tokens), jnp.asarray(lengths), key, jnp.int32(eos))
  prefill, compile_s = _compiled(prefill_fn, (settings, cache_dtype), args)
  t0 = time.perf_counter()
  state = prefill(*args)
  jax.block_until_ready(state)
  prefill_s = time.perf_counter() - t0

  emitted = np.zeros_like(lengths)

  def stream():
    nonlocal emitted
    out, count = _finalize(np.asarray(state["tokens"]), np.asarray(state["n"]), lengths,
                           settings.max_new_tokens, eos, pad)
    on_tokens([out[r, emitted[r]:count[r]] for r in range(len(lengths))])
    emitted = np.maximum(emitted, count)

  if on_tokens is not None:
    stream()
  stop_every = chunk_steps if on_tokens is not None else settings.max_new_tokens
  decode_s = 0.0
  while not bool(np.all(np.asarray(state["done"]))):
    decode, c = _compiled(decode_loop, (settings,), (variables, state, jnp.int32(0)), donate=(1,))
    compile_s += c
    t0 = time.perf_counter()
    state = decode(variables, state, state["step"] + jnp.int32(stop_every))
    jax.block_until_ready(state)
    decode_s += time.perf_counter() - t0
    if on_tokens is not None:
      stream()
  out, count = _finalize(np.asarray(state["tokens"]), np.asarray(state["n"]), lengths,
                         settings.max_new_tokens, eos, pad)
  result = [jnp.asarray(out, jnp.int32)]
  if return_logits:
    valid = np.arange(max_new_tokens)[None] < count[:, None]
    result.append(jnp.where(jnp.asarray(valid)[..., None], state["logits"][:, :max_new_tokens], 0.0))
  if return_routing:
    result.append(jax.tree.map(lambda r: r[:, :tokens.shape[1] + max_new_tokens], state["routing"]))
  if not return_stats:
    return result[0] if len(result) == 1 else tuple(result)
  steps = int(state["step"])
  total = int(count.sum())
  stats = {"steps": steps, "new_tokens": total, "prefill_s": prefill_s, "decode_s": decode_s,
           "compile_s": compile_s, "tokens_per_s": total / max(prefill_s + decode_s, 1e-9),
           "tokens_per_step": 1.0}
  if speculative:
    accepted, proposed = int(np.sum(state["accepted"])), int(np.sum(state["proposed"]))
    row_steps = proposed // settings.depth
    stats.update(accepted=accepted, proposed=proposed,
                 acceptance_rate=accepted / proposed if proposed else float("nan"),
                 tokens_per_step=(accepted + row_steps) / row_steps if row_steps else 1.0)
  return tuple(result) + (stats,)
