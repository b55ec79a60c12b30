"""Parameter accounting from shapes alone (`jax.eval_shape`, nothing allocated)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from deepseek_jax.config import ModelConfig


@functools.lru_cache(maxsize=32)
def abstract_variables(cfg: ModelConfig):
  """`jax.eval_shape` of `DeepSeekV3(cfg).init` on a [1, 1] token batch (ShapeDtypeStructs)."""
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  model = DeepSeekV3(cfg)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def count_params(cfg: ModelConfig) -> dict:
  """Counts the model's numbers by component.

  Returns:
    dict of ints: `total` (main model: embedding, layers, final norm, head, router biases), `active`
    (per token: the main model with only num_experts_per_tok of the routed experts of each MoE layer),
    `mtp` (the MTP modules' own weights; embedding and head are shared), and per component `embedding`,
    `head`, `attention`, `dense_mlp`, `routed_experts`, `shared_experts`, `router`, `norms`.
  """
  flat = {}
  for collection, tree in abstract_variables(cfg).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      flat[(collection,) + path] = int(leaf.size)
  out = dict(total=0, active=0, mtp=0, embedding=0, head=0, attention=0, dense_mlp=0,
             routed_experts=0, shared_experts=0, router=0, norms=0)
  k_over_e = (cfg.num_experts_per_tok / cfg.n_routed_experts) if cfg.n_routed_experts else 0.0
  routed_active = 0.0
  for path, n in flat.items():
    top = path[1]
    if top.startswith("mtp_"):
      out["mtp"] += n
      continue
    out["total"] += n
    if "experts" in path:
      out["routed_experts"] += n
      routed_active += n * k_over_e
    elif "shared_experts" in path:
      out["shared_experts"] += n
    elif "gate" in path:
      out["router"] += n
    elif "self_attn" in path:
      out["attention"] += n
    elif "mlp" in path:
      out["dense_mlp"] += n
    elif top == "embed_tokens":
      out["embedding"] += n
    elif top == "lm_head":
      out["head"] += n
    else:
      out["norms"] += n
  out["active"] = out["total"] - out["routed_experts"] + int(round(routed_active))
  return out
