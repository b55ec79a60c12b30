"""`--suite=decode`: one decoding step of the whole model against a long latent cache, side by side.

Every row of a batch sits at the middle of a `--seq_len`-slot cache (default 4096) and decodes one token; the
step is jitted with the cache donated, as `generate`'s loop runs it.  Contenders, compiled first and then
timed in interleaved rounds (`common.interleaved`):
- 'absorbed': attention in the latent space over the cached [c_kv | k_pe] (the DeepSeek decode);
- 'naive': the training path, kv_b re-expanding keys and values from the whole cached latent every step;
- 'absorbed_scan': `ModelConfig.scan_layers`, the cache stacked per run of layers and carried through the
  loop (`init_cache` of the scanned config);
- 'absorbed_scan_tuple': the scanned model fed the per-layer cache tuple (stacked and split every step).
Reports tokens/s (new tokens of the batch per second), the cache size, each time over 'absorbed', and each
contender's largest cache difference from 'absorbed' (all write the same latents).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax import DeepSeekV3, init_cache, layer_runs, to_layer_layout
from deepseek_jax.model import _unstack  # pylint: disable=protected-access  (the model's own per-layer split)
from experiments.benchmarks.common import bench_config, interleaved, machine


def _stepper(cfg, absorbed: bool):
  def step(variables, tokens, cache, start):
    return DeepSeekV3(cfg).apply(variables, tokens, cache=cache, cache_start=start, absorbed=absorbed).cache
  return jax.jit(step, donate_argnums=2)


def run(flags) -> dict:
  """Runs the suite; see the module docstring."""
  preset = getattr(flags, "preset", "") or "bench-6.5m"
  cfg = bench_config(preset)
  scfg = dataclasses.replace(cfg, scan_layers=True)
  batch = getattr(flags, "batch", 0) or 4
  length = getattr(flags, "seq_len", 0) or 4096
  runs = flags.runs or 10
  dtype = jnp.dtype(cfg.dtype)
  variables = jax.jit(DeepSeekV3(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  scanned = to_layer_layout(scfg, variables)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, 1), 0, cfg.vocab_size)
  start = jnp.full((batch,), length // 2, jnp.int32)
  contenders = {"absorbed": (cfg, True, variables, cfg), "naive": (cfg, False, variables, cfg),
                "absorbed_scan": (scfg, True, scanned, scfg),
                "absorbed_scan_tuple": (scfg, True, scanned, cfg)}
  caches, thunks = {}, {}
  for name, (model_cfg, absorbed, var, cache_cfg) in contenders.items():
    step = _stepper(model_cfg, absorbed)
    caches[name] = jax.block_until_ready(step(var, tokens, init_cache(cache_cfg, batch, length, dtype),
                                              start))
    print(f"[decode] compiled {name}", flush=True)

    def thunk(name=name, step=step, var=var):
      caches[name] = jax.block_until_ready(step(var, tokens, caches[name], start))
    thunks[name] = thunk
  timed = interleaved(thunks, runs)
  base = timed["absorbed"]["median_s"]
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(caches["absorbed"]))
  return {"suite": "decode", "machine": machine(), "config": preset, "batch": batch, "cache_len": length,
          "cache_bytes": cache_bytes, "dtype": str(dtype),
          "results": {name: dict(t, tokens_per_s=batch / t["median_s"], vs_absorbed=t["median_s"] / base,
                                 max_abs_diff_vs_absorbed=_max_diff(cfg, caches[name], caches["absorbed"]))
                      for name, t in timed.items()}}


def _max_diff(cfg, cache, reference) -> float:
  """Largest |cache - reference| over the main layers' latents, the scanned layout compared per layer."""
  layers = cache["layers"]
  if isinstance(layers, dict):
    layers = [c for name, a, b, _ in layer_runs(cfg) for c in _unstack(layers[name], b - a)]
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(list(layers)), jax.tree.leaves(list(reference["layers"]))))
