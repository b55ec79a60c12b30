"""DeepSeekV3: the whole model (also V2 / V2-Lite / R1 through their configs).

    tokens -> embed_tokens -> num_hidden_layers x DecoderLayer (dense MLP for the first
    first_k_dense_replace, DeepSeekMoE after) -> norm -> lm_head -> logits
                                   \\-> MTP depth 1..D (shared embedding and head) -> mtp_logits

The layers run the concrete implementation choices of `deepseek_jax.ops.impls.resolve_config(cfg)`; the
train step and the generator resolve once when built, and a model traced with 'auto' in its config resolves
them for the backend and the ambient mesh then.

Pure Flax Linen: `variables = model.init(rng, tokens)` holds 'params' and, for noaux_tc routing, the
non-trained 'router' collection (e_score_correction_bias per MoE layer); `model.apply(variables, tokens)`
returns a `ModelOutput`.  `init` returns plain arrays; `deepseek_jax.sharding.logical_axes` gives each
parameter's logical axis names.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear, dtype_of, normal_init
from deepseek_jax.layers.mtp import MTPLayer
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.transformer import ACT, remat_block, scan_layers, zeros_like_cache
from deepseek_jax.ops import impls


@flax.struct.dataclass
class ModelOutput:
  """What `DeepSeekV3.__call__` returns.

  Attributes:
    logits: [B, S, V] float32, next-token logits.
    mtp_logits: tuple over MTP depths k = 1..D of [B, S, V] float32; position i predicts token i + k + 1
      (the last k positions see padding and carry no target).
    tokens_per_expert: [L_moe, E] float32, routed assignments per expert for every MoE layer (main layers in
      order, then the MTP blocks); None for a dense model.
    balance_loss: [L_moe] float32, the sequence-wise balance loss sum_i f_i P_i per MoE layer (not yet times
      aux_loss_alpha).
    hidden: [B, S, D] the main model's final normalized hidden state (h^0 of the MTP modules).
    cache: the updated latent cache, when one was given.
  """
  logits: jax.Array
  mtp_logits: tuple = ()
  tokens_per_expert: Optional[jax.Array] = None
  balance_loss: Optional[jax.Array] = None
  hidden: Optional[jax.Array] = None
  cache: Any = None


def _stack_stats(stats):
  stats = [s for s in stats if s is not None]
  if not stats:
    return None, None
  return (jnp.stack([s["tokens_per_expert"] for s in stats]),
          jnp.stack([s["balance_loss"] for s in stats]))


def layer_runs(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
  """The main model's layers as maximal runs of one kind: (module name, start, stop, moe) per run.

  With `cfg.scan_layers` each run is one `nn.scan` module named 'layers_{start}_to_{stop - 1}' whose
  parameters carry a leading axis of stop - start layers (V3: 'layers_0_to_2' dense, 'layers_3_to_60' MoE).
  """
  runs: list[list] = []
  for i in range(cfg.num_hidden_layers):
    moe = cfg.is_moe_layer(i)
    if runs and runs[-1][2] == moe:
      runs[-1][1] = i + 1
    else:
      runs.append([i, i + 1, moe])
  return [(f"layers_{a}_to_{b - 1}", a, b, moe) for a, b, moe in runs]


def to_layer_layout(cfg: ModelConfig, variables: Mapping, *, donate: bool = False) -> dict:
  """`variables` (any collections: 'params', 'router') in the layer layout `cfg` builds.

  cfg.scan_layers: the per-layer subtrees 'layers_{i}' of each run are stacked into the run's scanned module
  (`layer_runs`); otherwise scanned runs are split back into 'layers_{i}'.  Trees already in cfg's layout
  pass through unchanged, so checkpoints and HF conversions (always per layer) load into either layout.
  NumPy leaves stay NumPy arrays; jax arrays keep their sharding.

  Args:
    cfg: the config whose layout is wanted.
    variables: the variables in either layout.
    donate: delete each converted jax array once its new layout exists, so that the conversion holds one
      copy of the weights plus one array at a time (the loaders, which own what they restored, pass True);
      `variables` must not be used afterwards.
  """
  runs = layer_runs(cfg)

  def convert(tree):
    if not isinstance(tree, Mapping):
      return tree
    tree = dict(tree)
    for name, a, b, _ in runs:
      per_layer = [f"layers_{i}" for i in range(a, b)]
      if cfg.scan_layers and all(k in tree for k in per_layer):
        tree[name] = _stack([tree.pop(k) for k in per_layer], donate=donate)
      elif not cfg.scan_layers and name in tree:
        tree.update(zip(per_layer, _unstack(tree.pop(name), b - a, donate=donate)))
    return tree

  return {c: convert(t) for c, t in variables.items()}


def _release(sources, result) -> None:
  """Deletes the jax arrays among `sources` once `result` is computed."""
  jax.block_until_ready(result)
  for v in sources:
    if isinstance(v, jax.Array) and not v.is_deleted():
      v.delete()


def _stack(trees, *, donate: bool = False) -> Any:
  def one(*v):
    if all(isinstance(x, np.ndarray) for x in v):
      return np.stack(v)
    out = jnp.stack(v)
    if donate:
      _release(v, out)
    return out
  return jax.tree.map(one, *trees)


def _unstack(tree, n: int, *, donate: bool = False) -> list:
  leaves, treedef = jax.tree.flatten(tree)
  parts = []
  for v in leaves:
    parts.append([v[j] for j in range(n)])
    if donate:
      _release([v], parts[-1])
  return [jax.tree.unflatten(treedef, [p[j] for p in parts]) for j in range(n)]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16) -> dict:
  """An empty latent KV cache for every layer and MTP depth: (kv_lora_rank + qk_rope_head_dim) numbers per
  token and layer.

  'layers' is a tuple of per-layer {'c_kv', 'k_pe'}; with `cfg.scan_layers` it is a dict from each run's
  module name (`layer_runs`) to that run's caches stacked along a leading layer axis, the layout the scanned
  layers read and write in place (the model also accepts the per-layer tuple there, at the cost of a stack
  and a split per call).
  """
  if cfg.scan_layers:
    layers = {name: zeros_like_cache(cfg, batch, length, dtype, layers=b - a)
              for name, a, b, _ in layer_runs(cfg)}
  else:
    layers = tuple(zeros_like_cache(cfg, batch, length, dtype) for _ in range(cfg.num_hidden_layers))
  return {"layers": layers,
          "mtp": tuple(zeros_like_cache(cfg, batch, length, dtype)
                       for _ in range(cfg.num_nextn_predict_layers))}


class DeepSeekV3(nn.Module):
  """DeepSeek-V3 language model with MLA, DeepSeekMoE and MTP (see module docstring)."""
  cfg: ModelConfig

  def setup(self):
    cfg = impls.resolve_config(self.cfg)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(normal_init(cfg.initializer_range),
                                                    ("vocab", "embed")))
    if cfg.scan_layers:
      for name, a, b, moe in layer_runs(cfg):
        setattr(self, name, scan_layers(cfg, moe, b - a))
    else:
      block = remat_block(cfg)
      self.layers = [block(cfg, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), fp8=False)
    self.mtp = [MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]

  def init(self, rngs, *args, **kwargs):  # pylint: disable=arguments-differ
    """`nn.Module.init` with the logical-partitioning boxes removed: plain arrays."""
    return nn.unbox(super().init(rngs, *args, **kwargs))

  def head(self, h):
    """Logits [.., V] float32 of normalized hidden states h."""
    if self.cfg.tie_word_embeddings:
      logits = self.embed_tokens.attend(h.astype(dtype_of(self.cfg.dtype)))
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)

  def embed(self, tokens):
    """Embeddings [B, S, D] of int tokens, in the compute dtype.

    The table is gathered whole along 'embed' first (it stays split over 'vocab'): looked up while split over
    'fsdp' along D, the result [B, S, D / fsdp] could reach the batch-split activation layout only through a
    full replication of [B, S, D] on every device, which XLA's partitioner falls back to.
    """
    table = self.embed_tokens.embedding.astype(dtype_of(self.cfg.dtype))
    table = nn.with_logical_constraint(table, ("vocab", None))
    return nn.with_logical_constraint(jnp.take(table, tokens, axis=0), ACT)

  def _positions(self, tokens, positions, cache_start):
    if positions is not None:
      return positions.astype(jnp.int32)
    s = tokens.shape[1]
    base = jnp.zeros((tokens.shape[0],), jnp.int32) if cache_start is None else cache_start
    return base[:, None].astype(jnp.int32) + jnp.arange(s, dtype=jnp.int32)[None]

  def main(self, tokens, positions=None, *, cache=None, cache_start=None, absorbed: bool = False):
    """The main model.  Returns (hidden [B,S,D] normalized, logits [B,S,V], stats list, layer caches)."""
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int [batch, seq], got shape {tokens.shape}")
    positions = self._positions(tokens, positions, cache_start)
    x = self.embed(tokens)
    stats, new_cache = [], []
    if cfg.scan_layers:
      # Caches of a run stacked along the scanned axis ({run name: stacked}); a per-layer tuple is stacked
      # going in and split coming out.
      per_layer = cache is not None and not isinstance(cache, Mapping)
      new_cache = {}
      for name, a, b, _ in layer_runs(cfg):
        run_cache = None
        if cache is not None:
          run_cache = dict(_stack(cache[a:b]) if per_layer else cache[name], layer=jnp.zeros((), jnp.int32))
        (x, run_cache), st = getattr(self, name)((x, run_cache), positions, None, cache_start, absorbed)
        stats += [None] * (b - a) if st is None else _unstack(st, b - a)
        if run_cache is not None:
          run_cache = {k: v for k, v in run_cache.items() if k != "layer"}
          new_cache[name] = _unstack(run_cache, b - a) if per_layer else run_cache
      if per_layer:
        new_cache = [c for per_run in new_cache.values() for c in per_run]
    else:
      if isinstance(cache, Mapping):
        raise ValueError("a cache stacked per run of layers ({run name: caches}) is the scan_layers layout; "
                         "this model is not scanned: pass init_cache(cfg, ...) of its own config")
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else cache[i]
        x, layer_cache, st = layer(x, positions, layer_cache, cache_start, absorbed)
        stats.append(st)
        new_cache.append(layer_cache)
    h = self.norm(x)
    if cache is not None and not isinstance(new_cache, Mapping):
      new_cache = tuple(new_cache)
    return h, self.head(h), stats, (None if cache is None else new_cache)

  def mtp_depth(self, k: int, h_prev, next_tokens, positions, *, cache=None, cache_start=None,
                absorbed: bool = False):
    """MTP depth k (1-based): h_prev [B,S,D] (h^{k-1}), next_tokens [B,S] = t_{i+k}.

    Returns (h^k [B,S,D], logits [B,S,V], router stats, updated cache)."""
    emb = self.embed(next_tokens)
    h, h_normed, cache, stats = self.mtp[k - 1](h_prev, emb, positions, cache, cache_start, absorbed)
    return h, self.head(h_normed), stats, cache

  def __call__(self, tokens, positions=None, *, cache=None, cache_start=None, absorbed: bool = False,
               mtp_tokens=None):
    """Full forward pass.

    Args:
      tokens: int32 [B, S].
      positions: optional int32 [B, S] rope positions (default arange(S), or cache_start + arange(S)).
      cache: optional latent cache from `init_cache` ({'layers': ..., 'mtp': ...}; a scanned model also takes
        the per-layer 'layers' tuple and returns that layout); new latents are written
        at slots cache_start[b] + i and attention sees slots up to each query's own.
      cache_start: int32 [B], first slot written (required with a cache).
      absorbed: run attention in the latent space (the decoding path).
      mtp_tokens: optional int32 [B, S + D] continuation used by the MTP depths (depth k reads
        mtp_tokens[:, k : k + S]); default: tokens shifted left, padded with 0 (training).
    Returns:
      ModelOutput.
    """
    cfg = self.cfg
    b, s = tokens.shape
    h, logits, stats, layer_cache = self.main(
        tokens, positions, cache=None if cache is None else cache["layers"], cache_start=cache_start,
        absorbed=absorbed)
    positions = self._positions(tokens, positions, cache_start)
    depth = cfg.num_nextn_predict_layers
    if mtp_tokens is None:
      mtp_tokens = jnp.concatenate([tokens, jnp.zeros((b, depth), tokens.dtype)], axis=1)
    mtp_logits, mtp_cache, h_prev = [], [], h
    for k in range(1, depth + 1):
      c = None if cache is None else cache["mtp"][k - 1]
      h_prev, lg, st, c = self.mtp_depth(k, h_prev, mtp_tokens[:, k:k + s], positions, cache=c,
                                         cache_start=cache_start, absorbed=absorbed)
      mtp_logits.append(lg)
      stats.append(st)
      mtp_cache.append(c)
    tpe, bal = _stack_stats(stats)
    new_cache = None if cache is None else {"layers": layer_cache, "mtp": tuple(mtp_cache)}
    return ModelOutput(logits=logits, mtp_logits=tuple(mtp_logits), tokens_per_expert=tpe,
                       balance_loss=bal, hidden=h, cache=new_cache)
