"""Parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on tiny random models.

Each case builds a random transformers model (float32, eager attention), writes it with save_pretrained,
loads it with deepseek_jax.interop.hf.load and compares the logits: max|diff| / max|ref| < 1e-5 (fp32 agrees
to about 5e-7 here; 1e-5 still separates a real difference such as a wrong norm epsilon, ~3e-5).  The grid
differs from the released configs in every dimension: q_lora on and off, sigmoid noaux_tc (V3) and softmax
greedy / group_limited_greedy (V2) routing, YaRN off, on with mscale == mscale_all_dim and with
mscale != mscale_all_dim, v_head_dim != qk_nope_head_dim, 40 tokens against a YaRN original window of 16,
first_k_dense_replace 1 and 2, norm_topk_prob both ways, rms_norm_eps 1e-5, 1 and 2 shared experts, the
rotate-half rope layout (rope_interleave=False), and a config whose MTP layer has no tensors.
"""

import os
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "interop"))
import hf_tiny  # noqa: E402  pylint: disable=g-import-not-at-top

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.interop import hf  # noqa: E402

YARN_EQUAL_MSCALE = dict(rope_type="yarn", rope_theta=10000.0, factor=2.5, original_max_position_embeddings=16,
                         beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)

CASES = {
    # V3: q_lora, YaRN with mscale != mscale_all_dim, group-limited noaux_tc, normalized weights, 1 shared.
    "v3_qlora_yarn_mscale": ("v3", dict()),
    # V3: plain q_proj, mscale == mscale_all_dim, 2 shared experts, unnormalized weights, 3 of 6 experts.
    "v3_q_proj_2shared_unnormed": ("v3", dict(
        q_lora_rank=None, n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=2.5, num_hidden_layers=2,
        max_position_embeddings=40,
        rope_parameters=YARN_EQUAL_MSCALE)),
    # V3: no YaRN, the rotate-half rope layout, one group, 2 dense layers first; the config keeps
    # transformers' default num_mtp_layers=1 with no MTP tensors in the file.
    "v3_rope_plain_rotate_half_no_mtp": ("v3", dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), rope_interleave=False, n_group=1,
        topk_group=1, first_k_dense_replace=2, num_hidden_layers=3, num_mtp_layers=1)),
    # V2-Lite-like: greedy softmax, plain q_proj, 2 shared experts, scaling 1.
    "v2_greedy": ("v2", dict()),
    # V2-like: group_limited_greedy softmax, q_lora, 1 shared expert, scaling 3, mscale != mscale_all_dim.
    "v2_group_limited": ("v2", dict(
        q_lora_rank=20, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=1, routed_scaling_factor=3.0,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                             mscale_all_dim=0.5))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
  kind, overrides = CASES[name]
  model = hf_tiny.build(kind, seed=sorted(CASES).index(name), **overrides)
  model.save_pretrained(tmp_path)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cfg, variables = hf.load(tmp_path)
  mtp_warned = any("num_nextn_predict_layers" in str(w.message) for w in caught)
  assert mtp_warned == (overrides.get("num_mtp_layers", 0) > 0)
  assert cfg.num_nextn_predict_layers == 0
  tokens = hf_tiny.tokens(cfg.vocab_size, batch=2, seq=40)
  ref = hf_tiny.logits(model, tokens)
  out = dsj.DeepSeekV3(cfg).apply(variables, tokens).logits
  err = hf_tiny.rel_err(out, ref)
  print(f"parity {name}: max relative error {err:.3e}")
  assert err < 1e-5, f"{name}: max|diff|/max|ref| = {err:.3e}"
