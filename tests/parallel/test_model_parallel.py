"""The whole model sharded over data + fsdp + expert (+ tensor) equals one device: forward, gradients,
router statistics, training steps; parameters and optimizer state sit where the rules say."""

import pytest

LAYOUTS = ("data2_fsdp2_expert2", "fsdp2_expert2_tensor2")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_device(layouts, layout):
  r = layouts[layout]
  assert r["logits"] < 1e-5 and r["grad_max"] < 1e-5, r
  # Router statistics are global sums under jit: exact, and so is the bias update they drive.
  assert r["tpe"] == 0.0 and r["balance"] < 1e-6 and r["bias"] == 0.0, r
  # Three AdamW steps: losses equal step for step.
  assert r["losses"] < 1e-5, (r["losses"], layouts["ref_losses"])
  assert len(layouts["ref_losses"]) == 3


@pytest.mark.slow
def test_parameter_shardings_follow_rules(layouts):
  # (path, expected spec) on data2_fsdp2_expert2 and on fsdp2_expert2_tensor2.
  expected = {
      "data2_fsdp2_expert2": {
          ".params['layers_1']['mlp']['experts']['gate_proj']": ["expert", "fsdp", None],
          ".params['layers_1']['mlp']['experts']['down_proj']": ["expert", None, "fsdp"],
          ".params['layers_1']['self_attn']['q_b_proj']['kernel']": [None, None, None],
          ".params['embed_tokens']['embedding']": [None, "fsdp"],
          ".params['layers_1']['mlp']['gate']['kernel']": ["fsdp", None],
          ".params['layers_1']['input_layernorm']['weight']": [None],
          ".opt_state[1].mu['layers_1']['mlp']['experts']['up_proj']": ["expert", "fsdp", None],
          ".opt_state[1].nu['embed_tokens']['embedding']": [None, "fsdp"],
          ".step": [],
      },
      "fsdp2_expert2_tensor2": {
          ".params['layers_1']['mlp']['experts']['gate_proj']": ["expert", "fsdp", "tensor"],
          ".params['layers_1']['mlp']['experts']['down_proj']": ["expert", "tensor", "fsdp"],
          ".params['layers_1']['self_attn']['q_b_proj']['kernel']": [None, "tensor", None],
          ".params['layers_1']['self_attn']['o_proj']['kernel']": ["tensor", None, "fsdp"],
          ".params['layers_1']['mlp']['shared_experts']['down_proj']['kernel']": ["tensor", "fsdp"],
          ".params['lm_head']['kernel']": ["fsdp", "tensor"],
          ".params['embed_tokens']['embedding']": ["tensor", "fsdp"],
          ".opt_state[1].mu['layers_1']['self_attn']['kv_b_proj']['kernel']": [None, "tensor", None],
      },
  }
  for layout, want in expected.items():
    specs = layouts[layout]["specs"]
    for path, spec in want.items():
      got = list(specs[path]) + [None] * (len(spec) - len(specs[path]))
      assert got == spec, (layout, path, specs[path])


@pytest.mark.slow
def test_pallas_kernels_run_per_device_and_match_one_device(script):
  # Attention and experts as the GPU runs them (Pallas, here in interpret mode) on data 2 x fsdp 2 x tensor 2.
  r = script("model_worker", "kernels")
  assert r["logits"] < 1e-5 and r["grad_max"] < 1e-5 and r["tpe"] == 0.0, r
  # FP8 GEMMs under the mesh: the weight gradient is summed per device, then over the token axes.
  assert r["fp8_dx"] < 1e-6 and r["fp8_dw"] < 1e-5, r
