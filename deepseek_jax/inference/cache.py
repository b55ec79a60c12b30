"""Latent KV cache bookkeeping: sizes, and per-row reads / writes at each row's own offset.

The cache itself is `deepseek_jax.init_cache` ({'layers': per layer {'c_kv', 'k_pe'} (with scan_layers: per
run of layers, stacked), 'mtp': per MTP depth});
every row of a batch advances independently, so the helpers here slice and update along the sequence axis
at a per-row start.  `jax.lax.dynamic_slice` clamps out-of-range starts (a silent shift), so the buffers are
sized with room for every write the decode loops make (`buffer_lengths`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.analysis.flops import kv_cache_bytes_per_token
from deepseek_jax.config import ModelConfig


def row_slice(x, start, size: int):
  """x[b, start[b] : start[b] + size] for every row b.

  Args:
    x: [B, T, ...] array.
    start: [B] int32 per-row start (start + size <= T).
    size: static slice length.
  Returns:
    [B, size, ...].
  """
  def one(row, s):
    return jax.lax.dynamic_slice_in_dim(row, s, size, axis=0)
  return jax.vmap(one)(x, start.astype(jnp.int32))


def row_update(x, new, start):
  """x with x[b, start[b] : start[b] + S] = new[b] for every row b (new [B, S, ...], same trailing dims)."""
  def one(row, val, s):
    return jax.lax.dynamic_update_slice_in_dim(row, val.astype(row.dtype), s, axis=0)
  return jax.vmap(one)(x, new, start.astype(jnp.int32))


def buffer_lengths(prompt_len: int, max_new_tokens: int, depth: int) -> tuple[int, int]:
  """(cache length, token-buffer length) for a batch whose longest prompt is `prompt_len`.

  Plain decoding (depth 0) writes one slot per step, the last at prompt_len + max_new_tokens - 2.  A
  speculative step of MTP depth D writes D + 1 slots from the last accepted position, and rows that finished
  keep computing (their writes are never read) up to D past their end, hence 2D of headroom in the cache;
  the MTP depths read tokens up to D further ahead.
  """
  cache_len = prompt_len + max_new_tokens + 2 * depth
  return cache_len, cache_len + depth + 1


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, *, include_mtp: bool = False) -> int:
  """Bytes the latent cache holds per token: (kv_lora_rank + qk_rope_head_dim) per layer
  (`analysis.flops.kv_cache_bytes_per_token`, kind 'mla').

  Args:
    cfg: the model.
    dtype: cache dtype.
    include_mtp: also count the MTP depths' caches (used by speculative decoding).
  """
  return kv_cache_bytes_per_token(cfg, "mla", dtype=np.dtype(dtype).name, include_mtp=include_mtp)


def mha_cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
  """Bytes per token of a standard multi-head KV cache of the same model (kind 'mha')."""
  return kv_cache_bytes_per_token(cfg, "mha", dtype=np.dtype(dtype).name)
