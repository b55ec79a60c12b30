"""Rollouts: G sampled completions per prompt from the project's generator, scored by the rewards.

`sample_groups`:
1. encodes each prompt as [bos] + prompt, checks it fits (prompt + max_new_tokens inside the context and
   inside `prompt_len`), repeats it G times (a group's rows consecutive) and right-pads to `prompt_len`;
2. samples with `deepseek_jax.inference.generate` (latent KV cache, one compiled loop), recording every
   token's routing when asked;
3. cuts each completion at its first EOS (kept: the policy learns to stop) and decodes it;
4. scores the completions with the reward functions;
5. lays each row out as prompt then completion in a [B, prompt_len + max_new_tokens] token array, with the
   masks the objective needs (which targets are completion tokens, which inputs the sampler fed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.inference.generate import generate
from deepseek_jax.posttrain import rewards as rewards_lib
from deepseek_jax.posttrain.tasks import Problem


@dataclasses.dataclass
class Rollout:
  """A batch of sampled completions, G per prompt.

  Attributes:
    tokens: int32 [B, S] prompt then completion per row, right-padded (S = prompt_len + max_new_tokens).
    completion_mask: float32 [B, S - 1], 1 where target t (token t + 1) is a completion token.
    fed: float32 [B, S - 1], 1 where input t was fed to the model while sampling.
    routing: the sampler's routing ({path: {'experts', 'weights'}} leaves [B, S, K]) or None.
    rewards: float32 [B] weighted total; reward_parts: {name: [B]}.
    completions: the decoded completions; lengths: int [B] completion tokens (EOS included).
  """
  tokens: np.ndarray
  completion_mask: np.ndarray
  fed: np.ndarray
  routing: Optional[Any]
  rewards: np.ndarray
  reward_parts: dict
  completions: list
  lengths: np.ndarray


def encode_prompts(tokenizer, cfg, prompts: Sequence[str], prompt_len: int, max_new_tokens: int):
  """[bos] + prompt ids, right-padded: (int32 [N, prompt_len], lengths [N]).

  Raises:
    ValueError: a prompt longer than prompt_len, or prompt_len + max_new_tokens beyond the context.
  """
  if prompt_len + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
                     f"context max_position_embeddings={cfg.max_position_embeddings}")
  out = np.full((len(prompts), prompt_len), tokenizer.pad_id, np.int32)
  lengths = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    ids = [tokenizer.bos_id] + list(tokenizer.encode(p))
    if len(ids) > prompt_len:
      raise ValueError(f"prompt {i} ({p[:40]!r}) has {len(ids)} tokens, more than prompt_len={prompt_len}")
    out[i, :len(ids)] = ids
    lengths[i] = len(ids)
  return out, lengths


def sample_groups(model, variables, tokenizer, problems: Sequence[Problem], reward_fns, *, group_size: int,
                  prompt_len: int, max_new_tokens: int, temperature: float, rng,
                  record_routing: bool) -> Rollout:
  """Samples and scores G completions of each problem (see module docstring).

  Args:
    model: the policy (DeepSeekV3).
    variables: its variables.
    tokenizer: a `deepseek_jax.data.Tokenizer`.
    problems: N problems.
    reward_fns: (name, fn, weight) triples for `rewards.score`.
    group_size: G.
    prompt_len: padded prompt length (fixed, so every batch reuses one compiled loop).
    max_new_tokens: completion budget.
    temperature: sampling temperature (> 0).
    rng: PRNG key.
    record_routing: keep the sampler's routing (MoE policies, for replay).
  Returns:
    Rollout with B = N x G rows.
  """
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: GRPO needs at least 2 completions per prompt")
  prompts, lengths = encode_prompts(tokenizer, model.cfg, [p.prompt for p in problems], prompt_len,
                                    max_new_tokens)
  prompts = np.repeat(prompts, group_size, axis=0)
  lengths = np.repeat(lengths, group_size, axis=0)
  answers = [p.answer for p in problems for _ in range(group_size)]
  eos = int(tokenizer.eos_id)
  out = generate(model, variables, prompts, prompt_lengths=lengths, max_new_tokens=max_new_tokens,
                 temperature=temperature, rng=rng, eos_id=eos, return_routing=record_routing)
  ids, routing = (out if record_routing else (out, None))
  ids = np.asarray(ids)
  b = ids.shape[0]
  is_eos = ids == eos
  counts = np.where(is_eos.any(1), is_eos.argmax(1) + 1, max_new_tokens).astype(np.int32)
  completions = [tokenizer.decode(ids[i, :counts[i]].tolist()) for i in range(b)]
  total, parts = rewards_lib.score(reward_fns, completions, answers)

  s = prompt_len + max_new_tokens
  tokens = np.full((b, s), tokenizer.pad_id, np.int32)
  pos = np.arange(s - 1)[None]
  for i in range(b):
    tokens[i, :lengths[i]] = prompts[i, :lengths[i]]
    tokens[i, lengths[i]:lengths[i] + counts[i]] = ids[i, :counts[i]]
  end = (lengths + counts)[:, None]
  completion_mask = ((pos >= lengths[:, None] - 1) & (pos < end - 1)).astype(np.float32)
  fed = (pos < end - 1).astype(np.float32)
  if routing is not None:
    routing = jax.tree.map(jnp.asarray, routing)
  return Rollout(tokens, completion_mask, fed, routing, total, parts, completions, counts)


def evaluate_accuracy(model, variables, tokenizer, problems: Sequence[Problem], *, prompt_len: int,
                      max_new_tokens: int, batch_size: int) -> float:
  """Greedy accuracy ('answer' reward) over `problems`, in batches of batch_size rows (the last padded)."""
  correct = 0
  eos = int(tokenizer.eos_id)
  for start in range(0, len(problems), batch_size):
    chunk = list(problems[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)     # one compiled shape
    prompts, lengths = encode_prompts(tokenizer, model.cfg, [p.prompt for p in chunk], prompt_len,
                                      max_new_tokens)
    ids = np.asarray(generate(model, variables, prompts, prompt_lengths=lengths,
                              max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos))
    for i in range(n):
      row = ids[i].tolist()
      row = row[:row.index(eos)] if eos in row else row
      correct += rewards_lib.answer_reward(tokenizer.decode(row), chunk[i].answer)
  return correct / max(len(problems), 1)
