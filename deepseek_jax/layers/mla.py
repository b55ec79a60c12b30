"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1).

Steps:
1. Query: q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x) without q_lora), per head
   [q_nope Dn | q_pe Dr]; RoPE on q_pe.
2. Latent: kv_a_proj_with_mqa(x) = [c_kv Dc | k_pe Dr]; c_kv = kv_a_layernorm(c_kv); RoPE on the single
   k_pe shared by all heads.  (c_kv, k_pe) is all a cache stores: Dc + Dr numbers per token and layer.
3a. Naive path (training, prefill): kv_b_proj expands c_kv to per-head [k_nope Dn | v Dv]; keys are
   [k_nope | k_pe]; standard attention with qk dim Dn + Dr and value dim Dv.
3b. Absorbed path (decoding): the key half of kv_b is folded into the query (q_c = q_nope W_uk^T, in the
   Dc latent space), attention runs directly over the cached (c_kv, k_pe), and the value half of kv_b is
   applied after attention.  Both paths compute the same function.
4. o_proj maps H x Dv back to D.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear, dtype_of
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin
from deepseek_jax.ops.attention import mla_attention
from deepseek_jax.ops.decode import absorbed_attention

# The latent norms use eps 1e-6 whatever config.rms_norm_eps says: DeepSeek's inference code and transformers
# build them as RMSNorm(rank) with the default eps (rms_norm_eps only reaches the block and final norms).
LATENT_NORM_EPS = 1e-6


def write_cache(cache: dict, c_kv, k_pe, start):
  """Writes S new latents per row at slots start[b] .. start[b] + S - 1 of the cache.

  A cache with a 'layer' entry holds a whole run of scanned layers ([L, B, T, ...]); the write goes to
  that layer in place.  Callers keep start[b] + S <= T: `dynamic_update_slice` clamps a write that would
  run past the end.
  """
  layer = cache.get("layer")
  if layer is None:
    def put(buf, new, s):
      return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (s, 0))
    write = jax.vmap(put)
  else:
    # One scatter of the B x S new rows into [L, B, T, D] (a vmap over the batch axis would transpose the
    # whole buffer); starts clamped as dynamic_update_slice clamps them.
    def write(buf, new, s):
      b, n = new.shape[:2]
      s = jnp.clip(s.astype(jnp.int32), 0, buf.shape[2] - n)
      rows = (jnp.arange(b, dtype=jnp.int32)[:, None], s[:, None] + jnp.arange(n, dtype=jnp.int32)[None])
      return buf.at[(layer,) + rows].set(new.astype(buf.dtype), mode="promise_in_bounds")
  return dict(cache, c_kv=write(cache["c_kv"], c_kv, start), k_pe=write(cache["k_pe"], k_pe, start))


def read_cache(cache: dict) -> tuple:
  """(c_kv [B,T,Dc], k_pe [B,T,Dr]) of the cache's layer (see `write_cache`)."""
  layer = cache.get("layer")
  if layer is None:
    return cache["c_kv"], cache["k_pe"]
  return tuple(jax.lax.dynamic_index_in_dim(cache[k], layer, 0, keepdims=False) for k in ("c_kv", "k_pe"))


class MLA(nn.Module):
  """Multi-head Latent Attention with a naive and an absorbed path (see module docstring)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_head_dim
    if cfg.q_lora_rank is None:
      self.q_proj = Linear(cfg, (d,), (h, qk), ("embed", "heads", "qk_dim"))
    else:
      self.q_a_proj = Linear(cfg, (d,), (cfg.q_lora_rank,), ("embed", "q_lora"))
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, cfg.param_dtype)
      self.q_b_proj = Linear(cfg, (cfg.q_lora_rank,), (h, qk), ("q_lora", "heads", "qk_dim"))
    self.kv_a_proj_with_mqa = Linear(cfg, (d,), (cfg.kv_lora_rank + cfg.qk_rope_head_dim,),
                                     ("embed", "kv_lora_rope"))
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, cfg.param_dtype)
    self.kv_b_proj = Linear(cfg, (cfg.kv_lora_rank,), (h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                            ("kv_lora", "heads", "kv_dim"))
    self.o_proj = Linear(cfg, (h, cfg.v_head_dim), (d,), ("heads", "v_dim", "embed"))

  def queries(self, x, cos, sin):
    """q_nope [B,S,H,Dn] and rotated q_pe [B,S,H,Dr]."""
    cfg = self.cfg
    if cfg.q_lora_rank is None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, apply_rope(q_pe, cos, sin)

  def latents(self, x, cos, sin):
    """Normalized c_kv [B,S,Dc] and rotated k_pe [B,S,Dr]: what the cache holds."""
    cfg = self.cfg
    kv = self.kv_a_proj_with_mqa(x)
    c_kv = self.kv_a_layernorm(kv[..., :cfg.kv_lora_rank])
    k_pe = apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin)
    return c_kv, k_pe

  def __call__(self, x, positions, *, cache: Optional[dict] = None, cache_start=None,
               absorbed: bool = False):
    """Self-attention of x [B,S,D] at `positions` [B,S].

    Args:
      x: [B, S, D] activations.
      positions: [B, S] int32 rope positions.
      cache: optional {'c_kv': [B,T,Dc], 'k_pe': [B,T,Dr]}; the S new latents are written at slots
        cache_start[b] + i and the queries attend to slots <= their own.
      cache_start: [B] int32 first slot written, required with a cache.
      absorbed: attend in the latent space (the decoding path) instead of expanding per-head K/V.
    Returns:
      (out [B,S,D], the updated cache or None).
    """
    cfg = self.cfg
    dtype = dtype_of(cfg.dtype)
    x = x.astype(dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    q_nope, q_pe = self.queries(x, cos, sin)
    c_kv, k_pe = self.latents(x, cos, sin)
    q_slots = None
    if cache is not None:
      if cache_start is None:
        raise ValueError("MLA: cache_start [B] is required with a cache")
      cache = write_cache(cache, c_kv, k_pe, cache_start)
      c_kv, k_pe = (a.astype(dtype) for a in read_cache(cache))
      s = x.shape[1]
      q_slots = cache_start[:, None].astype(jnp.int32) + jnp.arange(s, dtype=jnp.int32)[None]
    if absorbed:
      w_kv_b = self.kv_b_proj.kernel().astype(dtype)        # [Dc, H, Dn + Dv]
      w_uk, w_uv = w_kv_b[..., :cfg.qk_nope_head_dim], w_kv_b[..., cfg.qk_nope_head_dim:]
      q_c = jnp.einsum("BSHN,CHN->BSHC", q_nope, w_uk)
      o_c = absorbed_attention(q_c, q_pe, c_kv, k_pe, scale=cfg.softmax_scale, q_slots=q_slots,
                               impl=cfg.decode_impl, interpret=cfg.pallas_interpret)
      o = jnp.einsum("BSHC,CHV->BSHV", o_c, w_uv)
    else:
      kv = self.kv_b_proj(c_kv)                             # [B, T, H, Dn + Dv] (an FP8 GEMM under fp8)
      k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
      q_nope = nn.with_logical_constraint(q_nope, ("activation_batch", "activation_length",
                                                   "activation_heads", None))
      o = mla_attention(q_nope, q_pe, k_nope, k_pe, v, scale=cfg.softmax_scale, q_slots=q_slots,
                        impl=cfg.attention_impl, interpret=cfg.pallas_interpret)
    return self.o_proj(o.astype(dtype)), cache
