"""FP8 checkpoints: the released blockwise E4M3 layout loads to its dequantized weights; save(fp8=True)
writes it."""

import json
import math
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import deepseek_jax as dsj
from deepseek_jax.interop import hf, safetensors_io

pytest.importorskip("transformers")
import hf_tiny  # noqa: E402  pylint: disable=g-import-not-at-top

E4M3 = ml_dtypes.float8_e4m3fn
# The linear weights the release stores in FP8: attention projections and every MLP / expert projection
# (not the router gate, embedding, head, norms or eh_proj).
QUANTIZED = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|"
                       r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")


def quantize_reference(w, block):
  """Blockwise E4M3 in float64 NumPy, block by block: (codes, scale_inv, dequantized float32)."""
  b0, b1 = block
  rows, cols = w.shape
  codes = np.zeros(w.shape, E4M3)
  scale = np.zeros((math.ceil(rows / b0), math.ceil(cols / b1)), np.float32)
  deq = np.zeros(w.shape, np.float32)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      sl = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
      blk = w[sl].astype(np.float64)
      s = np.float32(np.abs(blk).max() / 448.0)
      codes[sl] = (blk / np.float64(s)).astype(E4M3)
      scale[i, j] = s
      deq[sl] = (codes[sl].astype(np.float64) * np.float64(s)).astype(np.float32)
  return codes, scale, deq


SMALL = dict(rms_norm_eps=1e-6, num_hidden_layers=2)
# Widths of 200 / 300 against 128-blocks: every matrix has ragged edge blocks.
WIDE = dict(rms_norm_eps=1e-6, num_hidden_layers=2, hidden_size=200, intermediate_size=300,
            moe_intermediate_size=136, num_attention_heads=2, q_lora_rank=136, kv_lora_rank=72,
            qk_nope_head_dim=24, v_head_dim=20, n_routed_experts=4, n_group=2, topk_group=1)


@pytest.mark.parametrize("block,overrides", [((16, 24), SMALL), ((128, 128), WIDE)], ids=["16x24", "128"])
def test_fp8_checkpoint_loads_to_its_dequantized_weights(tmp_path, block, overrides):
  ref = hf_tiny.build("v3", seed=11, **overrides)
  ref.save_pretrained(tmp_path / "fp32")
  tensors = load_file(tmp_path / "fp32" / "model.safetensors")
  with open(tmp_path / "fp32" / "config.json") as f:
    config = json.load(f)
  fp8, deq = {}, {}
  for name, w in tensors.items():
    if QUANTIZED.search(name):
      codes, scale, d = quantize_reference(w, block)
      fp8[name], fp8[name + "_scale_inv"], deq[name] = codes, scale, d
    else:
      fp8[name] = w.astype(ml_dtypes.bfloat16) if not name.endswith("e_score_correction_bias") else w
      deq[name] = fp8[name].astype(np.float32)
  assert sum(1 for n in fp8 if n.endswith("_scale_inv")) > 20
  for d, t, q in [(tmp_path / "fp8", fp8, True), (tmp_path / "deq", deq, False)]:
    os.makedirs(d)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg_d = dict(config)
    if q:
      cfg_d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
    with open(d / "config.json", "w") as f:
      json.dump(cfg_d, f)
  cfg_a, va, report = hf.load_with_report(tmp_path / "fp8")
  cfg_b, vb = hf.load(tmp_path / "deq")
  assert report.fp8_dequantized == sum(1 for n in fp8 if n.endswith("_scale_inv"))
  for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The logits are those of transformers running the dequantized weights.
  theirs = type(ref).from_pretrained(tmp_path / "deq", attn_implementation="eager", dtype="float32")
  tokens = hf_tiny.tokens(cfg_a.vocab_size, batch=2, seq=24)
  err = hf_tiny.rel_err(dsj.DeepSeekV3(cfg_a).apply(va, tokens).logits, hf_tiny.logits(theirs, tokens))
  print(f"fp8 checkpoint (block {block}) vs transformers on its dequantized weights: {err:.3e}")
  assert err < 1e-5


def test_save_fp8_writes_the_released_layout(tmp_path, tiny_cfg):
  import test_hf_roundtrip  # pylint: disable=g-import-not-at-top
  _, variables = test_hf_roundtrip._random_model(tiny_cfg, seed=2)  # pylint: disable=protected-access
  block = (16, 24)
  hf.save(tmp_path / "q", tiny_cfg, variables, fp8=True, block_size=block)
  with open(tmp_path / "q" / "config.json") as f:
    config = json.load(f)
  assert config["quantization_config"]["weight_block_size"] == [16, 24]
  assert config["quantization_config"]["fmt"] == "e4m3"
  ckpt = safetensors_io.Checkpoint(tmp_path / "q")
  n = tiny_cfg.num_hidden_layers
  for name, info in ckpt.tensors.items():
    if name.endswith("_scale_inv"):
      w = ckpt.tensors[name[:-len("_scale_inv")]]
      assert info.dtype == "F32"
      assert info.shape == (math.ceil(w.shape[0] / 16), math.ceil(w.shape[1] / 24)), name
    elif QUANTIZED.search(name):
      assert info.dtype == "F8_E4M3", name
      assert name + "_scale_inv" in ckpt.tensors
    elif name.endswith("e_score_correction_bias"):
      assert info.dtype == "F32"
    else:  # embedding, head, norms, router gate, eh_proj
      assert info.dtype == "BF16", name
  assert ckpt.tensors[f"model.layers.{n}.eh_proj.weight"].dtype == "BF16"
  assert ckpt.tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"
  # Reading back: each quantized weight within E4M3's rounding of the original (half an ulp: 2^-4 relative
  # for normal codes, 2^-10 of the block scale for subnormal ones).
  cfg, loaded = hf.load(tmp_path / "q")
  w = np.asarray(variables["params"]["layers_1"]["mlp"]["experts"]["down_proj"][5]).T   # [out, in]
  got = np.asarray(loaded["params"]["layers_1"]["mlp"]["experts"]["down_proj"][5]).T
  scale = ckpt.read("model.layers.1.mlp.experts.5.down_proj.weight_scale_inv")
  s_full = np.repeat(np.repeat(scale, 16, 0), 24, 1)[:w.shape[0], :w.shape[1]]
  assert np.all(np.abs(got - w) <= 2.0**-4 * np.abs(w) + 2.0**-10 * s_full + 1e-12)
  assert np.max(np.abs(got - w)) > 0  # it really went through E4M3
  emb = np.asarray(variables["params"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(np.asarray(loaded["params"]["embed_tokens"]["embedding"]),
                                emb.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert cfg.num_nextn_predict_layers == 1
