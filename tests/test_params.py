"""count_params against docs/reference.md, and against the arrays init makes."""

import jax
import jax.numpy as jnp
import pytest

import deepseek_jax as dsj


def test_v3_counts_match_reference():
  n = dsj.analysis.count_params(dsj.ModelConfig.preset("deepseek-v3"))
  assert n["total"] == 671_026_419_200
  assert n["active"] == 37_552_297_472
  assert n["mtp"] == 11_610_068_224
  assert n["embedding"] == n["head"] == 926_679_040
  # The whole HF checkpoint adds the MTP layer's own copies of embed_tokens and shared_head.head.
  assert n["total"] + n["mtp"] + n["embedding"] + n["head"] == 684_489_845_504


def test_v3_per_layer_counts():
  n = dsj.analysis.count_params(dsj.ModelConfig.preset("deepseek-v3"))
  assert n["attention"] == 61 * 187_107_328
  assert n["dense_mlp"] == 3 * 396_361_728
  assert n["routed_experts"] == 58 * 256 * 44_040_192
  assert n["router"] == 58 * (1_835_008 + 256)
  moe_layer = 256 * 44_040_192 + 44_040_192 + 1_835_008 + 256
  assert moe_layer == 11_320_164_608


@pytest.mark.parametrize("preset,total,active", [
    ("deepseek-v2", 235.74e9, 21.38e9),
    ("deepseek-v2-lite", 15.706e9, None),
])
def test_v2_counts(preset, total, active):
  n = dsj.analysis.count_params(dsj.ModelConfig.preset(preset))
  assert round(n["total"] / 1e9, 2 if total > 100e9 else 3) == round(total / 1e9, 2 if total > 100e9 else 3)
  if active:
    assert round(n["active"] / 1e9, 2) == round(active / 1e9, 2)
  assert n["mtp"] == 0


def test_total_plus_mtp_is_every_array_init_makes(tiny_cfg):
  model = dsj.DeepSeekV3(tiny_cfg)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  n = dsj.analysis.count_params(tiny_cfg)
  assert n["total"] + n["mtp"] == sum(x.size for x in jax.tree.leaves(variables))
  expert_numbers = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(variables["params"])
                       if "experts" in jax.tree_util.keystr(p) and "shared" not in jax.tree_util.keystr(p)
                       and "mtp" not in jax.tree_util.keystr(p))
  k, e = tiny_cfg.num_experts_per_tok, tiny_cfg.n_routed_experts
  assert n["active"] == n["total"] - expert_numbers + expert_numbers * k // e
