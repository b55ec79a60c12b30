"""Speculative decoding with the MTP modules as the draft model (V3 section 2.2 / 5.4.3).

Notation per row: n tokens t_0 .. t_{n-1} are known; the main cache holds slots 0 .. n-2 (t_{n-1} is not yet
fed); MTP depth k (1-based, k = 1..D) at position j takes h^{k-1}_j (h^0: the main model's final normed
hidden) and Emb(t_{j+k}) and predicts t_{j+k+1}, so its cache and hidden state are exact ("true") for
j <= n-1-k; later positions hold provisional values computed from drafts.  Drafts d_1 .. d_D for positions
n .. n+D-1 sit in the token buffer.

One step:
1. Verify: the main model runs the D + 1 queries [t_{n-1}, d_1 .. d_D] at slots n-1 .. n+D-1 (absorbed
   attention, Sq = D + 1), giving target logits for positions n .. n+D and h^0 at n-1 .. n+D-1.
2. Accept: greedy takes the longest prefix of drafts equal to the target argmax plus the target's next
   token; sampling accepts d_j with probability min(1, p_j(d_j) / q_j(d_j)), on the first rejection draws
   from norm(max(0, p_j - q_j)), and draws a bonus token from p_D when all D are accepted (this keeps the
   target distribution exactly).  With a drafts accepted the row gains a + 1 tokens: n' = n + a + 1.
   Rolling back is implicit: the stale slots past n' - 2 are overwritten by the next step's writes before
   any query can see them (queries attend to slots <= their own).
3. Draft: depth k re-runs over positions max(n-k, 0) .. n+D-1 (D + k queries), which covers every position
   whose value was provisional or is new, with h^{k-1} from this step (depth 1: the verify's h^0) and
   tokens from the buffer (true up to t_{n'-1}, then the new drafts).  Its output at position n' - 2 is the
   next draft d'_k for position n' - 1 + k.  h^k is kept in a [B, T, D] buffer for k = 1..D-1 because depth
   k+1 also needs the one position before depth k's window.
Rows advance independently (per-row cache_start and write offsets); finished rows keep computing but no
longer change their tokens or counters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.inference.cache import buffer_lengths, row_slice, row_update
from deepseek_jax.inference.sampling import probabilities, sample, sample_from_probs
from deepseek_jax.inference.settings import init_logits, step_key, store_logits, update_done
from deepseek_jax.model import DeepSeekV3, init_cache


def accept_greedy(target_logits, drafts):
  """Longest agreeing prefix for greedy decoding.

  Args:
    target_logits: [B, D+1, V] main-model logits at the verified positions.
    drafts: int32 [B, D] drafted tokens.
  Returns:
    (accepted [B] int32 in 0..D, tokens [B, D+1]: the a accepted drafts then the target's own token at
    index a; entries past a are meaningless).
  """
  target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
  agree = (drafts == target[:, :-1]).astype(jnp.int32)
  accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
  # target[j] == drafts[j] for j < accepted, so the argmax row is already the new tokens.
  return accepted, target


def accept_sampled(key, p, q, drafts):
  """Standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

  Args:
    key: PRNG key.
    p: [B, D+1, V] target distributions at the verified positions.
    q: [B, D, V] draft distributions the drafts were sampled from.
    drafts: int32 [B, D].
  Returns:
    (accepted [B] int32, tokens [B, D+1]): drafts 0..a-1, then the resampled or bonus token at index a.
  """
  b, d = drafts.shape
  k_accept, k_resample = jax.random.split(key)
  p_d = jnp.take_along_axis(p[:, :d], drafts[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_accept, (b, d))
  ok = (u * q_d < p_d).astype(jnp.int32)                       # u < p/q, without dividing by q
  accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
  residual = jnp.maximum(p[:, :d] - q, 0.0)
  # p == q on the draft's support leaves no residual mass (and then rejection has probability 0).
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[:, :d])
  dist = jnp.concatenate([residual, p[:, d:]], axis=1)         # [B, D+1, V]; index D: the bonus
  chosen = jnp.take_along_axis(dist, accepted[:, None, None], axis=1)[:, 0]
  extra = sample_from_probs(k_resample, chosen)
  j = jnp.arange(d + 1)[None]
  drafts_ext = jnp.concatenate([drafts, jnp.zeros((b, 1), drafts.dtype)], axis=1)
  return accepted, jnp.where(j < accepted[:, None], drafts_ext, extra[:, None])


def _draft(settings, key, logits, tok, active, n_new, k):
  """Chooses depth k's draft from logits [B, V] and writes it at position n_new - 1 + k of active rows."""
  draft = sample(key, logits, settings.sampling)
  pos = n_new - 1 + k
  old = row_slice(tok, pos, 1)[:, 0]
  tok = row_update(tok, jnp.where(active, draft, old)[:, None], pos)
  q = None if settings.sampling.greedy else probabilities(logits, settings.sampling)
  return tok, q


def speculative_prefill(settings, cache_dtype, variables, tokens, lengths, key, eos_id):
  """Prefill of the main model and every MTP depth, and the first drafts.

  Args:
    settings: static `DecodeSettings` (speculative).
    cache_dtype: latent cache dtype (static).
    variables: model variables.
    tokens: int32 [B, P] right-padded prompts; lengths: int32 [B]; key: PRNG key; eos_id: int32 scalar.
  Returns:
    The decode state (see `plain_prefill`) plus hidden (tuple of D-1 [B, T, D] buffers of h^1..h^{D-1}),
    q (draft distributions, sampling only), accepted / proposed [B] counters.
  """
  model, cfg, depth = settings.model, settings.cfg, settings.depth
  b, p = tokens.shape
  cache_len, tok_len = buffer_lengths(p, settings.max_new_tokens, depth)
  cache = init_cache(cfg, b, cache_len, cache_dtype)
  zeros = jnp.zeros((b,), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  h, logits, _, layers = model.apply(variables, tokens, positions, cache=cache["layers"],
                                     cache_start=zeros, absorbed=False, method=DeepSeekV3.main)
  key0 = step_key(key, 0)
  first_logits = row_slice(logits, lengths - 1, 1)[:, 0]
  first = sample(key0, first_logits, settings.sampling)
  tok = jnp.zeros((b, tok_len), jnp.int32).at[:, :p].set(tokens)
  tok = row_update(tok, first[:, None], lengths)
  n = lengths + 1
  active = jnp.ones((b,), bool)
  hidden = [jnp.zeros((b, cache_len, cfg.hidden_size), h.dtype) for _ in range(depth - 1)]
  mtp_caches, qs = [], []
  for k in range(1, depth + 1):
    h, lg, _, c = model.apply(variables, k, h, tok[:, k:k + p], positions, cache=cache["mtp"][k - 1],
                              cache_start=zeros, absorbed=False, method=DeepSeekV3.mtp_depth)
    mtp_caches.append(c)
    if k < depth:
      hidden[k - 1] = row_update(hidden[k - 1], h, zeros)
    tok, q = _draft(settings, jax.random.fold_in(key0, k), row_slice(lg, n - 2, 1)[:, 0], tok, active,
                    n, k)
    qs.append(q)
  done = update_done(settings, eos_id, jnp.zeros((b,), bool), active, first[:, None],
                     jnp.ones((b,), jnp.int32), n, lengths)
  state = {"tokens": tok, "n": n, "lengths": lengths, "done": done, "step": jnp.zeros((), jnp.int32),
           "key": key, "eos_id": eos_id, "cache": {"layers": layers, "mtp": tuple(mtp_caches)},
           "hidden": tuple(hidden),
           "accepted": zeros, "proposed": zeros}
  if not settings.sampling.greedy:
    state["q"] = jnp.stack(qs, axis=1)
  if settings.keep_logits:
    state["logits"] = init_logits(settings, first_logits)
  return state


def speculative_step(settings, variables, state):
  """One verify + accept + draft step (see module docstring)."""
  model, depth = settings.model, settings.depth
  tok, n, lengths = state["tokens"], state["n"], state["lengths"]
  active = ~state["done"]
  step = state["step"] + 1
  key = step_key(state["key"], step)

  # 1. Verify t_{n-1}, d_1 .. d_D at slots n-1 .. n+D-1.
  start = n - 1
  verify = row_slice(tok, start, depth + 1)
  positions = start[:, None] + jnp.arange(depth + 1, dtype=jnp.int32)[None]
  h0, logits, _, layers = model.apply(variables, verify, positions, cache=state["cache"]["layers"],
                                      cache_start=start, absorbed=True, method=DeepSeekV3.main)
  drafts = verify[:, 1:]

  # 2. Accept.
  if settings.sampling.greedy:
    accepted, window = accept_greedy(logits, drafts)
  else:
    accepted, window = accept_sampled(jax.random.fold_in(key, 0),
                                      probabilities(logits, settings.sampling), state["q"], drafts)
  window = jnp.where(active[:, None], window, row_slice(tok, n, depth + 1))
  tok = row_update(tok, window, n)
  accepted = jnp.where(active, accepted, 0)
  gained = jnp.where(active, accepted + 1, 0)
  n_new = n + gained
  done = update_done(settings, state["eos_id"], state["done"], active, window, gained, n_new, lengths)

  # 3. Re-run each MTP depth over its window and draft the next tokens (drafted at position n_new - 2).
  h_prev, hidden, mtp_caches, qs = h0, list(state["hidden"]), [], []
  for k in range(1, depth + 1):
    size = depth + k
    s_k = start if k == 1 else jnp.maximum(n - k, 0)
    if k > 1:
      h_prev = row_slice(hidden[k - 2], s_k, size)
    pos_k = s_k[:, None] + jnp.arange(size, dtype=jnp.int32)[None]
    h_k, lg, _, c = model.apply(variables, k, h_prev, row_slice(tok, s_k + k, size), pos_k,
                                cache=state["cache"]["mtp"][k - 1], cache_start=s_k, absorbed=True,
                                method=DeepSeekV3.mtp_depth)
    mtp_caches.append(c)
    if k < depth:
      hidden[k - 1] = row_update(hidden[k - 1], h_k, s_k)
    at = jnp.clip(n_new - 2 - s_k, 0, size - 1)
    tok, q = _draft(settings, jax.random.fold_in(key, k), row_slice(lg, at, 1)[:, 0], tok, active, n_new,
                    k)
    qs.append(q)

  new = dict(state, tokens=tok, n=n_new, done=done, step=step,
             cache={"layers": layers, "mtp": tuple(mtp_caches)}, hidden=tuple(hidden),
             accepted=state["accepted"] + accepted,
             proposed=state["proposed"] + depth * active.astype(jnp.int32))
  if not settings.sampling.greedy:
    new["q"] = jnp.where(active[:, None, None], jnp.stack(qs, axis=1), state["q"])
  if settings.keep_logits:
    new["logits"] = store_logits(state, logits, active)
  return new
