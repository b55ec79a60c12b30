"""Memory plan arithmetic: shard sizes against independent counts from the abstract parameters."""

import math

import jax
import pytest
from flax import traverse_util

import deepseek_jax as dsj
from deepseek_jax.analysis import memory
from deepseek_jax.analysis.params import abstract_variables


def _numbers(cfg, pred=lambda path: True):
  flat = {}
  for col, tree in abstract_variables(cfg).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      flat[(col,) + path] = leaf
  return sum(math.prod(v.shape) for p, v in flat.items() if pred(p))


def test_single_device_plan_counts_every_number(tiny_cfg):
  plan = memory.memory_plan(tiny_cfg, {}, batch_size=2, seq_len=8, param_dtype="float32",
                            opt_dtype="bfloat16")
  total = _numbers(tiny_cfg)
  assert plan["params_total"] == total
  assert plan["params"] == plan["grads"] == 4 * total
  assert plan["optimizer"] == 2 * 2 * total          # mu + nu in bf16, no master copy for fp32 params
  assert plan["total"] == plan["params"] + plan["grads"] + plan["optimizer"] + plan["activations"]


def test_expert_axis_divides_exactly_the_routed_experts(tiny_cfg):
  base = memory.memory_plan(tiny_cfg, {}, batch_size=8, seq_len=8)
  ep = memory.memory_plan(tiny_cfg, {"expert": 8}, batch_size=8, seq_len=8)
  routed = _numbers(tiny_cfg, lambda p: "experts" in p and "shared_experts" not in p)
  assert routed > 0
  # The routed experts (E=8) shard 8 ways, everything else stays whole.
  assert base["params"] - ep["params"] == 4 * routed * 7 // 8
  # Fully sharded arrays: per-device bytes x devices == their total bytes.
  assert (ep["params"] - 4 * (_numbers(tiny_cfg) - routed)) * 8 == 4 * routed


def test_fsdp_and_zero1(tiny_cfg):
  # 'embed' (64 wide) splits over fsdp=4 in every matrix that has it; norms and 1-D arrays stay whole.
  plan = memory.memory_plan(tiny_cfg, {"fsdp": 4}, batch_size=8, seq_len=8)
  flat = {}
  from deepseek_jax.sharding import logical_axes
  from deepseek_jax.model import DeepSeekV3
  import jax.numpy as jnp
  specs = traverse_util.flatten_dict(jax.tree.map(
      lambda s: tuple(s), logical_axes(DeepSeekV3(tiny_cfg), jnp.zeros((1, 1), jnp.int32)),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  shapes = {}
  for col, tree in abstract_variables(tiny_cfg).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shapes[(col,) + path] = leaf.shape
  expected = sum(math.prod(shape) // (4 if "embed" in specs[p] else 1) for p, shape in shapes.items())
  assert plan["params"] == 4 * expected
  # ZeRO-1 over data=2 halves every optimizer copy that has an even unsharded dim.
  z = memory.memory_plan(tiny_cfg, {"data": 2}, batch_size=8, seq_len=8, zero1_axes=("data",))
  assert z["params"] == 4 * _numbers(tiny_cfg)
  assert z["optimizer"] == 8 * _numbers(tiny_cfg) // 2


def test_v3_on_the_report_cluster():
  cfg = dsj.ModelConfig.preset("deepseek-v3")
  plan = memory.memory_plan(cfg, {"data": 32, "expert": 64}, batch_size=2048, seq_len=4096,
                            param_dtype="bfloat16", opt_dtype="bfloat16", compute_dtype="bfloat16",
                            remat_policy="full", zero1_axes=("data",), attention_impl="pallas",
                            capacity_factor=1.25)
  # docs/reference.md: main 671,026,419,200 + MTP 11,610,068,224 (embedding and head shared) numbers.
  assert plan["params_total"] == 671_026_419_200 + 11_610_068_224
  assert plan["devices"] == 2048 and plan["tokens_per_device"] == 4096
  # Routed experts: 58 + 1 (MTP) MoE layers x 256 experts x 44,040,192, split 64 ways; the rest replicated.
  routed = 59 * 256 * 44_040_192
  assert plan["params"] == 2 * (plan["params_total"] - routed + routed // 64)
  assert "data=32 x expert=64" in memory.format_memory_plan(plan)


def test_parse_mesh():
  assert memory.parse_mesh("data:32,expert:64") == {"data": 32, "expert": 64}
  with pytest.raises(ValueError, match="pipeline:4"):
    memory.parse_mesh("pipeline:4")
