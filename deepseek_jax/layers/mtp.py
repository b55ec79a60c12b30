"""Multi-Token Prediction modules (V3 section 2.2, eq. 21-23).

Depth k predicts token i + k + 1 at position i:
  h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])    (embedding first, as the released weights)
  h^k  = TRM_k(h')                                             (one decoder block, MoE in V3)
  logits = lm_head(shared_head.norm(h^k))                      (embedding and head shared with the main model)
h^0 is the main model's final (normalized) hidden state, which is what the released MTP weights are
served with.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.transformer import DecoderLayer


class MTPLayer(nn.Module):
  """One MTP depth: enorm, hnorm, eh_proj, a decoder block, and shared_head.norm (the head is shared)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.hidden_size
    self.enorm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
    self.hnorm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)
    self.eh_proj = Linear(cfg, (2 * d,), (d,), ("mtp_concat", "embed"))
    self.block = DecoderLayer(cfg, moe=cfg.n_routed_experts is not None)
    self.shared_head_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.param_dtype)

  def __call__(self, h_prev, emb_next, positions, cache=None, cache_start=None, absorbed=False):
    """h_prev, emb_next [B,S,D] -> (h^k [B,S,D], normed h^k for the head, cache, router stats)."""
    x = jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev.astype(emb_next.dtype))], axis=-1)
    h = self.eh_proj(x)
    h, cache, stats = self.block(h, positions, cache, cache_start, absorbed)
    return h, self.shared_head_norm(h), cache, stats
