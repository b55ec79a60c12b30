"""Routing replay: route the training forward exactly as the sampler did.

The generator records every token's routed experts and gate weights (`generate(return_routing=True)`: a
tree {MoE layer path: {'experts' [B, S, K], 'weights' [B, S, K]}}).  Given to the model as its 'replay'
collection, each router uses those experts instead of its own top-k (and, with the weights, those gate
weights; without them the gate weights are the current router's scores at the replayed experts, so the
router still learns).  The policy ratio of GRPO then compares the same sub-network the tokens were sampled
from.  With replay off, `expert_mismatch` measures how many tokens the training forward routes differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def replay_collection(routing, length: int, *, weights: bool = False) -> dict:
  """The model's 'replay' collection from recorded routing, cut to the first `length` positions.

  Args:
    routing: the recorded tree ({path: {'experts', 'weights'}} leaves [B, S, K]).
    length: positions of the forward pass that replays it.
    weights: replay the gate weights too (else only the experts).
  Returns:
    The tree to pass as variables['replay'].
  """
  keep = ("experts", "weights") if weights else ("experts",)

  def cut(node):
    if isinstance(node, dict) and "experts" in node and not isinstance(node["experts"], dict):
      return {k: node[k][:, :length] for k in keep}
    return {k: cut(v) for k, v in node.items()}

  return cut(dict(routing))


def experts_of(routing) -> list:
  """The 'experts' leaves [B, S, K] of a routing tree, in a fixed order."""
  flat = jax.tree_util.tree_flatten_with_path(routing)[0]
  return [leaf for path, leaf in flat if getattr(path[-1], "key", None) == "experts"]


def expert_mismatch(a, b, valid):
  """Share of (token, MoE layer) pairs whose expert sets differ between two routings.

  Args:
    a, b: routing trees of the same layers, leaves [B, S', K] or flat [B * S', K] (as a forward records
      them), S' >= S.
    valid: [B, S] 1 where the token was routed in both (the fed positions); positions past S are ignored.
  Returns:
    float32 scalar in [0, 1].
  """
  valid = valid.astype(jnp.float32)
  rows, s = valid.shape
  diff, count = jnp.float32(0.0), jnp.float32(0.0)
  for x, y in zip(experts_of(a), experts_of(b)):
    x = jnp.sort(x.reshape(rows, -1, x.shape[-1])[:, :s], axis=-1)
    y = jnp.sort(y.reshape(rows, -1, y.shape[-1])[:, :s], axis=-1)
    differs = jnp.any(x != y, axis=-1).astype(jnp.float32)
    diff += (differs * valid).sum()
    count += valid.sum()
  return diff / jnp.maximum(count, 1.0)
