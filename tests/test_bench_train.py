"""The train benchmark's profile of our step: files written, time attributed to the model's modules."""

import json
import os

from experiments.benchmarks import train as train_bench
from experiments.benchmarks.common import bench_config


def test_profile_of_our_step_names_the_layers(tmp_path):
  cfg = bench_config("tiny", num_hidden_layers=2)   # a dense and an MoE layer, and the MTP block
  _, _, step_and_args = train_bench._ours(cfg, 2, 32)  # pylint: disable=protected-access
  out = train_bench._profile(step_and_args, str(tmp_path))  # pylint: disable=protected-access
  assert {"trace", "train_step.hlo.txt", "ops.json", "summary.txt"} <= set(os.listdir(tmp_path))
  with open(tmp_path / "ops.json") as f:
    ops = json.load(f)["ops"]
  seen = {(o["phase"], o["module"].split("/")[1] if "/" in o["module"] else o["module"]) for o in ops}
  # Attention and MoE layers, forward and backward, and the optimizer outside the gradient.
  for phase in ("forward", "backward"):
    assert (phase, "self_attn") in seen and (phase, "mlp") in seen
  assert any(o["phase"] == "other" for o in ops)
  assert out["busy_ms"] > 0 and 0 < out["utilization"] and out["by_module"]


def test_ablated_steps_run_the_stand_ins_only_inside_the_block():
  import pytest  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import ablation  # pylint: disable=g-import-not-at-top
  cfg = bench_config("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)   # a dense and an MoE layer
  import jax  # pylint: disable=g-import-not-at-top

  def step():
    """(loss, parameter shapes) of one train step."""
    thunk, _, (_, state, _) = train_bench._ours(cfg, 2, 16)  # pylint: disable=protected-access
    return float(thunk()), jax.tree.map(lambda a: a.shape, state.params)

  full, shapes = step()
  originals = {part: getattr(module, name) for part, (module, name, _) in ablation.PARTS.items()}
  for part in ablation.parts("all"):
    with ablation.without(part):
      without, ablated_shapes = step()
    assert without != pytest.approx(full, rel=1e-6), part   # the stand-in ran,
    assert ablated_shapes == shapes, part                   # with the same parameters to update
  # and is gone after the block
  assert all(getattr(m, n) is originals[p] for p, (m, n, _) in ablation.PARTS.items())
  assert ablation.parts("all") == sorted(ablation.PARTS)
  assert ablation.parts(" attention, routed_experts") == ["attention", "routed_experts"]
  with pytest.raises(ValueError, match="unknown part"):
    ablation.parts("attention,optimizer")
  with pytest.raises(ValueError, match="unknown part"):
    with ablation.without("optimizer"):
      pass


def test_impl_choices_parse_into_config_variants():
  import pytest  # pylint: disable=g-import-not-at-top
  got = train_bench._impl_choices(" matmul_impl=xla, moe_impl=blocked")  # pylint: disable=protected-access
  assert got == {"impl:matmul_impl=xla": {"matmul_impl": "xla"}, "impl:moe_impl=blocked": {"moe_impl": "blocked"}}
  got = train_bench._impl_choices("attention_impl=host+moe_impl=host")  # pylint: disable=protected-access
  assert got == {"impl:attention_impl=host+moe_impl=host": {"attention_impl": "host", "moe_impl": "host"}}
  assert train_bench._impl_choices("") == {}  # pylint: disable=protected-access
  for bad in ("matmul_impl", "dtype=bfloat16", "moe_impl="):
    with pytest.raises(ValueError, match="--impls"):
      train_bench._impl_choices(bad)  # pylint: disable=protected-access
