"""ModelConfig: validation messages, presets against docs/reference.md, HF config.json layouts."""

import json

import pytest

import deepseek_jax as dsj
from deepseek_jax.layers.rope import rope_frequencies, yarn_correction_range


@pytest.mark.parametrize("changes,field", [
    (dict(num_experts_per_tok=257), "num_experts_per_tok"),
    (dict(topk_group=9), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-4), "q_lora_rank"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace"),
    (dict(n_group=8, topk_group=1, num_experts_per_tok=8, n_routed_experts=16), "num_experts_per_tok"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(eos_token_id=10**6), "eos_token_id"),
    (dict(rope_scaling=dict(type="yarn", factor=0.5)), "rope_scaling.factor"),
    (dict(dtype="int8"), "dtype"),
])
def test_invalid_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    dsj.ModelConfig.preset("deepseek-v3", **changes)


def test_unknown_preset():
  with pytest.raises(ValueError, match="deepseek-v9"):
    dsj.ModelConfig.preset("deepseek-v9")


def test_presets_match_released_configs():
  v3 = dsj.ModelConfig.preset("deepseek-v3")
  assert (v3.vocab_size, v3.hidden_size, v3.intermediate_size, v3.moe_intermediate_size) == (
      129280, 7168, 18432, 2048)
  assert (v3.num_hidden_layers, v3.first_k_dense_replace, v3.num_attention_heads) == (61, 3, 128)
  assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim) == (
      1536, 512, 128, 64, 128)
  assert (v3.n_routed_experts, v3.n_shared_experts, v3.num_experts_per_tok, v3.n_group,
          v3.topk_group) == (256, 1, 8, 8, 4)
  assert (v3.topk_method, v3.scoring_func, v3.norm_topk_prob, v3.routed_scaling_factor) == (
      "noaux_tc", "sigmoid", True, 2.5)
  assert v3.num_nextn_predict_layers == 1 and v3.max_position_embeddings == 163840
  v2 = dsj.ModelConfig.preset("deepseek-v2")
  assert (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok, v2.topk_group,
          v2.topk_method, v2.routed_scaling_factor) == (160, 2, 6, 3, "group_limited_greedy", 16.0)
  lite = dsj.ModelConfig.preset("deepseek-v2-lite")
  assert lite.q_lora_rank is None and lite.num_attention_heads == 16 and lite.topk_method == "greedy"
  assert lite.rope_scaling.mscale == lite.rope_scaling.mscale_all_dim == 0.707


def test_tiny_exercises_every_feature(tiny_cfg):
  c = tiny_cfg
  assert c.q_lora_rank and c.rope_scaling is not None and c.topk_method == "noaux_tc"
  assert c.scoring_func == "sigmoid" and c.n_group > 1 and c.topk_group < c.n_group
  assert c.n_shared_experts >= 1 and 0 < c.first_k_dense_replace < c.num_hidden_layers
  assert c.num_nextn_predict_layers == 1


def test_yarn_numbers_of_v3():
  v3 = dsj.ModelConfig.preset("deepseek-v3")
  assert yarn_correction_range(64, 10000.0, v3.rope_scaling) == (10, 23)
  assert v3.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
  m = dsj.config.yarn_get_mscale(40.0, 1.0)
  assert m == pytest.approx(1.36889, abs=1e-5)
  inv_freq, attention_factor = rope_frequencies(v3)
  base = 1.0 / 10000 ** (2 * __import__("numpy").arange(32) / 64)
  assert attention_factor == 1.0
  assert inv_freq[:10] == pytest.approx(base[:10], rel=1e-6)          # extrapolated: unchanged
  assert inv_freq[23:] == pytest.approx(base[23:] / 40.0, rel=1e-6)   # interpolated: divided by s


def test_hf_round_trip_and_transformers5_layout(tmp_path):
  v3 = dsj.ModelConfig.preset("deepseek-v3")
  (tmp_path / "config.json").write_text(json.dumps(v3.to_hf()))
  assert dsj.ModelConfig.from_hf(tmp_path) == v3
  released = v3.to_hf()
  assert released["rope_scaling"]["factor"] == 40.0 and released["num_nextn_predict_layers"] == 1
  t5 = dict(released)
  rs = t5.pop("rope_scaling")
  t5.pop("num_nextn_predict_layers")
  t5.pop("rope_theta")
  t5["rope_parameters"] = dict(rs, rope_type="yarn", rope_theta=10000.0)
  t5["num_mtp_layers"] = 1
  assert dsj.ModelConfig.from_hf(t5) == v3


def test_from_hf_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    dsj.ModelConfig.from_hf(tmp_path)
  with pytest.raises(ValueError, match="llama"):
    dsj.ModelConfig.from_hf({"model_type": "llama"})
