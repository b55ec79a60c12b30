"""Auxiliary-loss-free load balancing (report section 2.1.2) and expert-load statistics.

After each training step, outside the gradient, every MoE layer's routing bias moves by gamma against its
load: b_i += gamma * sign(mean_load - load_i) (an overloaded expert goes down, an underloaded one up), with
loads counted over the whole global batch (every microbatch, every data shard).

The model reports `tokens_per_expert` [L_moe, E] with the main MoE layers in order and then the MTP blocks;
`variables['router']` holds the biases under the same layers, which `bias_paths` lists in that order
(`layers_{i}` by numeric i, then `mtp_{k}`); a scanned run `layers_{a}_to_{b}` (ModelConfig.scan_layers)
holds b - a + 1 stacked biases [n, E], the rows of layers a..b.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import traverse_util

BIAS_NAME = "e_score_correction_bias"


def _layer_key(path: tuple) -> tuple:
  top = path[0]
  m = re.fullmatch(r"(layers|mtp)_(\d+)(?:_to_\d+)?", top)
  if m is None:
    raise ValueError(f"router state path {'/'.join(path)} is not under layers_<i>, layers_<a>_to_<b> or "
                     "mtp_<k>")
  return (0 if m.group(1) == "layers" else 1, int(m.group(2)))


def bias_paths(router) -> list[tuple]:
  """Paths of the routing biases in the order of the model's statistics rows.

  Args:
    router: the 'router' collection (nested dicts).
  Returns:
    list of key tuples (e.g. ('layers_3', 'mlp', 'gate', 'e_score_correction_bias')).
  """
  flat = traverse_util.flatten_dict(router)
  return sorted((p for p in flat if p[-1] == BIAS_NAME), key=_layer_key)


def update_bias(router, tokens_per_expert, gamma):
  """One auxiliary-loss-free bias step.

  Args:
    router: the 'router' collection; biases [E] float32.
    tokens_per_expert: [L_moe, E] loads of the step (summed over the global batch).
    gamma: update speed (scalar, may be traced).
  Returns:
    The updated router collection (same structure); unchanged when it holds no biases.
  """
  paths = bias_paths(router)
  if not paths:
    return router
  flat = dict(traverse_util.flatten_dict(router))
  rows = [1 if flat[p].ndim == 1 else flat[p].shape[0] for p in paths]  # stacked [n, E] when scanned
  if tokens_per_expert.shape[0] != sum(rows):
    raise ValueError(f"tokens_per_expert has {tokens_per_expert.shape[0]} rows but the router state holds "
                     f"{sum(rows)} biases")
  load = tokens_per_expert.astype(jnp.float32)
  step = jnp.sign(load.mean(axis=-1, keepdims=True) - load) * jnp.asarray(gamma, jnp.float32)
  row = 0
  for path, n in zip(paths, rows):
    delta = step[row] if flat[path].ndim == 1 else step[row:row + n]
    flat[path] = (flat[path].astype(jnp.float32) + delta).astype(flat[path].dtype)
    row += n
  return traverse_util.unflatten_dict(flat)


def load_imbalance(tokens_per_expert):
  """Max over mean expert load per MoE layer (1 = perfectly balanced).

  Args:
    tokens_per_expert: [L_moe, E].
  Returns:
    [L_moe] float32.
  """
  load = tokens_per_expert.astype(jnp.float32)
  return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)


def bias_stats(router) -> dict:
  """Mean, standard deviation and max |b| over all routing biases (zeros when there are none).

  Args:
    router: the 'router' collection.
  Returns:
    {'bias_mean', 'bias_std', 'bias_absmax'} float32 scalars.
  """
  paths = bias_paths(router)
  if not paths:
    z = jnp.float32(0.0)
    return {"bias_mean": z, "bias_std": z, "bias_absmax": z}
  flat = traverse_util.flatten_dict(router)
  b = jnp.concatenate([flat[p].astype(jnp.float32).reshape(-1) for p in paths])
  return {"bias_mean": b.mean(), "bias_std": b.std(), "bias_absmax": jnp.abs(b).max()}

