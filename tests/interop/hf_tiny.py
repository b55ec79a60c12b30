"""Tiny random transformers DeepSeek-V2/V3 models for the parity and interop tests (needs torch + transformers).

`build(kind, seed, **config)` makes a float32 eager DeepseekV3ForCausalLM / DeepseekV2ForCausalLM with random
weights, randomised RMSNorm weights and (V3) a nonzero e_score_correction_bias, so that no parameter sits at
its neutral value and a mapping error in any tensor changes the logits.
"""

from __future__ import annotations

import numpy as np

V3_BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=16, q_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12,
    v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
    first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.7, initializer_range=0.08,
    rms_norm_eps=1e-5, max_position_embeddings=64, num_mtp_layers=0,
    rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=4.0, original_max_position_embeddings=16,
                         beta_fast=24.0, beta_slow=2.0, mscale=0.9, mscale_all_dim=0.6))

V2_BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=12,
    v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
    topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False, initializer_range=0.08,
    rms_norm_eps=1e-5, max_position_embeddings=64,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                         original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                         mscale_all_dim=0.707))


def build(kind: str, seed: int = 0, **overrides):
  """A random float32 transformers model of `kind` ('v3' or 'v2') with config V3_BASE / V2_BASE + overrides."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  base = dict(V3_BASE if kind == "v3" else V2_BASE)
  base.update(overrides)
  base["num_key_value_heads"] = base["num_attention_heads"]
  if kind == "v3":
    config = transformers.DeepseekV3Config(**base)
    cls = transformers.DeepseekV3ForCausalLM
  else:
    config = transformers.DeepseekV2Config(**base)
    cls = transformers.DeepseekV2ForCausalLM
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = cls(config).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.2 * torch.randn(b.shape, generator=gen))
  return model


def logits(model, tokens: np.ndarray) -> np.ndarray:
  """float32 logits [B, S, V] of the transformers model for int tokens [B, S]."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tokens(vocab: int, batch: int = 2, seq: int = 40, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


def rel_err(a, b) -> float:
  """max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
