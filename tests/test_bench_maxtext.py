"""The MaxText contender of the train benchmark: our config mapped onto MaxText's base.yml fields."""

import dataclasses

import pytest

from deepseek_jax.analysis.params import count_params
from deepseek_jax.config import ModelConfig, RopeScaling
from experiments.benchmarks import maxtext_step
from experiments.benchmarks.common import bench_config


def test_bench_config_maps_field_by_field():
  cfg = bench_config()
  o = maxtext_step.maxtext_overrides(cfg)
  assert (o["decoder_block"], o["attention_type"]) == ("deepseek", "mla")
  assert (o["base_emb_dim"], o["base_num_decoder_layers"], o["first_num_dense_layers"]) == (256, 4, 1)
  assert (o["base_num_query_heads"], o["base_num_kv_heads"]) == (8, 8)
  assert (o["q_lora_rank"], o["kv_lora_rank"]) == (128, 64)
  assert (o["qk_nope_head_dim"], o["qk_rope_head_dim"], o["v_head_dim"]) == (32, 16, 32)
  assert (o["base_mlp_dim"], o["base_moe_mlp_dim"]) == (512, 128)
  assert (o["num_experts"], o["num_experts_per_tok"], o["shared_experts"]) == (16, 4, 1)
  assert (o["n_routing_groups"], o["topk_routing_group"]) == (4, 2)
  assert (o["routed_score_func"], o["routed_bias"], o["routed_scaling_factor"]) == ("sigmoid", True, 2.5)
  assert o["norm_topk_prob"] is True and o["vocab_size"] == 512 and o["mtp_num_layers"] == 0
  assert (o["rope_type"], o["dtype"], o["weight_dtype"]) == ("default", "float32", "float32")


def test_yarn_and_ungrouped_routing_map():
  o = maxtext_step.maxtext_overrides(ModelConfig.preset("deepseek-v3"))
  assert (o["rope_type"], o["rope_factor"], o["original_max_position_embeddings"]) == ("yarn", 40.0, 4096)
  assert (o["beta_fast"], o["beta_slow"], o["mscale"]) == (32.0, 1.0, 1.0)
  assert (o["n_routing_groups"], o["topk_routing_group"]) == (8, 4)
  assert (o["num_experts"], o["num_experts_per_tok"], o["first_num_dense_layers"]) == (256, 8, 3)
  o = maxtext_step.maxtext_overrides(dataclasses.replace(bench_config(), n_group=1, topk_group=1))
  assert (o["n_routing_groups"], o["topk_routing_group"]) == (-1, -1)


@pytest.mark.parametrize("change, match", [
    (dataclasses.asdict(ModelConfig.preset("deepseek-v2")), "sigmoid"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256, mscale=0.7,
                                   mscale_all_dim=1.0)), "mscale"),
])
def test_unmappable_configs_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    maxtext_step.maxtext_overrides(dataclasses.replace(bench_config(), **change))


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="variant"):
    maxtext_step.maxtext_train_step(bench_config(), 1, 8, variant="megablox")


@pytest.mark.skipif(not maxtext_step.available(), reason="maxtext is not installed (needs Python >= 3.12)")
def test_maxtext_builds_the_same_model():
  cfg = bench_config()
  step, info = maxtext_step.maxtext_train_step(cfg, 2, 32, "dense")
  assert info["params"] == count_params(cfg)["total"]
  assert step() < info["first_loss"] + 1.0
