"""Routing replay: route the training forward exactly as the sampler did.

The generator records every token's routed experts and gate weights (`generate(return_routing=True)`: a
tree {MoE layer path: {'experts' [B, S, K], 'weights' [B, S, K]}}; a scanned run of layers (`scan_layers`)
is one path with leaves [B, S, L, K]).  Given to the model as its 'replay'
collection, each router uses those experts instead of its own top-k (and, with the weights, those gate
weights; without them the gate weights are the current router's scores at the replayed experts, so the
router still learns).  The policy ratio of GRPO then compares the same sub-network the tokens were sampled
from.  With replay off, `expert_mismatch` measures how many tokens the training forward routes differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def replay_collection(routing, length: int, *, weights: bool = False) -> dict:
  """The replay tree of recorded routing, cut to the first `length` positions.

  Batch first like the recording (rows split and sliced like the rollout's); `policy.forward_log_probs` hands
  it to the model as its 'replay' collection (through `model_layout`).

  Args:
    routing: the recorded tree ({path: {'experts', 'weights'}} leaves [B, S, K]).
    length: positions of the forward pass that replays it.
    weights: replay the gate weights too (else only the experts).
  Returns:
    The tree for `forward_log_probs(replay=...)`.
  """
  keep = ("experts", "weights") if weights else ("experts",)

  def cut(node):
    if isinstance(node, dict) and "experts" in node and not isinstance(node["experts"], dict):
      return {k: node[k][:, :length] for k in keep}
    return {k: cut(v) for k, v in node.items()}

  return cut(dict(routing))


def model_layout(replay):
  """A batch-first replay tree in the model's layout: a scanned run's leaves [B, S, L, K] -> [L, B, S, K]."""
  return jax.tree.map(lambda r: jnp.moveaxis(r, 2, 0) if r.ndim == 4 else r, replay)


def experts_of(routing) -> list:
  """The 'experts' leaves [B, S, K] of a routing tree, in a fixed order."""
  flat = jax.tree_util.tree_flatten_with_path(routing)[0]
  return [leaf for path, leaf in flat if getattr(path[-1], "key", None) == "experts"]


def expert_mismatch(a, b, valid):
  """Share of (token, MoE layer) pairs whose expert sets differ between two routings.

  Args:
    a, b: routing trees of the same layers, leaves [B, S', K] (a scanned run: [B, S', L, K]) or flat
      [B * S', K], S' >= S.
    valid: [B, S] 1 where the token was routed in both (the fed positions); positions past S are ignored.
  Returns:
    float32 scalar in [0, 1].
  """
  valid = valid.astype(jnp.float32)
  rows, s = valid.shape
  diff, count = jnp.float32(0.0), jnp.float32(0.0)
  for x, y in zip(experts_of(a), experts_of(b)):
    x = jnp.sort(x.reshape((rows, -1) + x.shape[2 if x.ndim == 4 else -1:])[:, :s], axis=-1)
    y = jnp.sort(y.reshape((rows, -1) + y.shape[2 if y.ndim == 4 else -1:])[:, :s], axis=-1)
    differs = jnp.any(x != y, axis=-1).astype(jnp.float32)        # [B, S] (a scanned run: [B, S, L])
    v = valid.reshape(valid.shape + (1,) * (differs.ndim - 2))
    diff += (differs * v).sum()
    count += valid.sum() * (differs.shape[2] if differs.ndim == 3 else 1)
  return diff / jnp.maximum(count, 1.0)
