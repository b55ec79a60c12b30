"""The DeepSeekMoE router: scores, group-limited top-k selection, gate weights, balance statistics.

Steps (all in float32):
1. logits = x W_gate^T; scores = sigmoid(logits) (V3) or softmax(logits) (V2).
2. Selection scores = scores + e_score_correction_bias (noaux_tc only; the bias steers selection and never
   the weights - auxiliary-loss-free balancing, V3 section 2.1.2).
3. Group limiting: group score = sum of the top-2 selection scores of each of n_group groups (noaux_tc) or
   the group max (group_limited_greedy); keep topk_group groups, mask the others with -inf.
4. Top-K experts of the masked selection scores; weights gathered from the unbiased scores, normalized to
   sum 1 if norm_topk_prob (denominator + 1e-20), times routed_scaling_factor.
5. Statistics: tokens per expert, and the sequence-wise balance loss sum_i f_i P_i (V3 eq. 17-20) with
   f_i = E / (K S) x (tokens of the sequence routed to i), P_i = mean over the sequence of the normalized scores.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import dtype_of, normal_init, param
from deepseek_jax.ops.per_shard import per_shard


def select_experts(cfg: ModelConfig, scores, bias=None):
  """Top-K expert ids [T, K] and gate weights [T, K] from float32 scores [T, E] (steps 2-4)."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  choice = scores if bias is None else scores + bias[None, :]
  if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.n_group > 1:
    grouped = choice.reshape(choice.shape[0], cfg.n_group, e // cfg.n_group)
    if cfg.topk_method == "noaux_tc":
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_scores = grouped.max(-1)
    _, group_idx = jax.lax.top_k(group_scores, cfg.topk_group)
    group_mask = jax.nn.one_hot(group_idx, cfg.n_group, dtype=jnp.float32).sum(1) > 0   # [T, G]
    mask = jnp.repeat(group_mask, e // cfg.n_group, axis=-1)
    choice = jnp.where(mask, choice, -jnp.inf)
  _, idx = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return idx, weights * cfg.routed_scaling_factor


def balance_statistics(cfg: ModelConfig, scores, idx, batch: int):
  """(tokens_per_expert [E], sequence-wise balance loss) for scores [B*S, E], idx [B*S, K]."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  counts = jax.nn.one_hot(idx, e, dtype=jnp.float32).sum(1)               # [T, E]
  tokens_per_expert = counts.sum(0)
  counts = counts.reshape(batch, -1, e)
  seq = counts.shape[1]
  f = jax.lax.stop_gradient(counts.sum(1)) * (e / (k * seq))              # [B, E]
  normalized = scores / scores.sum(-1, keepdims=True)
  p = normalized.reshape(batch, seq, e).mean(1)                           # [B, E]
  return tokens_per_expert, jnp.mean(jnp.sum(f * p, axis=-1))


def _per_token_shards(fn, scores, bias):
  """fn(scores [T, E], bias) -> [T, K] arrays, run on each device's own tokens under a mesh.

  XLA's partitioner gathers every token of the global batch onto every device before a top_k whose token
  dim is split; the selection is per token, so each device selects for its own tokens
  (`ops.per_shard.per_shard` over the token axes).
  """
  if bias is None:
    return per_shard(lambda s: fn(s, None), (scores,), ("b.",), ("b.", "b."), check_vma=True)
  return per_shard(fn, (scores, bias), ("b.", "."), ("b.", "b."), check_vma=True)


class Router(nn.Module):
  """The gate of one MoE layer.  Params: `kernel` [D, E]; state (collection 'router'):
  `e_score_correction_bias` [E] float32 for noaux_tc."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, batch: int):
    """Routes x [T, D] (T = batch x seq) -> (idx [T,K], weights [T,K] fp32, stats dict)."""
    cfg = self.cfg
    w = param(self, "kernel", normal_init(cfg.initializer_range),
              (cfg.hidden_size, cfg.n_routed_experts), ("embed", "expert_gate"),
              dtype_of(cfg.param_dtype))
    logits = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    logits = nn.with_logical_constraint(logits, ("activation_batch", None))
    if cfg.scoring_func == "sigmoid":
      scores = jax.nn.sigmoid(logits)
    else:
      scores = jax.nn.softmax(logits, axis=-1)
    bias = None
    if cfg.has_router_bias:
      bias = self.variable(
          "router", "e_score_correction_bias",
          nn.with_logical_partitioning(lambda: jnp.zeros((cfg.n_routed_experts,), jnp.float32),
                                       ("expert_gate",))).value
      bias = jax.lax.stop_gradient(bias.astype(jnp.float32))
    idx, weights = _per_token_shards(functools.partial(select_experts, cfg), scores, bias)
    idx, weights = self._replay_and_record(scores, idx, weights)
    tokens_per_expert, balance = balance_statistics(cfg, scores, idx, batch)
    return idx, weights, {"tokens_per_expert": tokens_per_expert, "balance_loss": balance}

  # ---------------------------------------------------------------------------------------- routing replay
  # Collection 'replay' (input, read-only): `experts` int [.., K] (and optionally `weights` [.., K]) per
  # token of this call, routing it exactly so; without `weights` the gate weights are those of the current
  # scores at the replayed experts (the router keeps its gradient).  Collection 'routing' (output, when
  # mutable, never at init, so `init` makes no such collection): the `experts` [T, K] and `weights` [T, K]
  # this call used.
  def _replay_and_record(self, scores, idx, weights):
    cfg = self.cfg
    k = cfg.num_experts_per_tok
    if self.has_variable("replay", "experts"):
      idx = self.get_variable("replay", "experts").reshape(-1, k).astype(jnp.int32)
      if self.has_variable("replay", "weights"):
        weights = self.get_variable("replay", "weights").reshape(-1, k).astype(jnp.float32)
      else:
        weights = gate_weights(cfg, scores, idx)
    if self.is_mutable_collection("routing") and not self.is_initializing():
      self.put_variable("routing", "experts", idx)
      self.put_variable("routing", "weights", weights)
    return idx, weights


def gate_weights(cfg: ModelConfig, scores, idx):
  """Gate weights [T, K] of given experts idx [T, K] from float32 scores [T, E] (step 4)."""
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor
