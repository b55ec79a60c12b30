"""Greedy generation equals transformers' greedy `generate` on a checkpoint transformers wrote."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.inference import generate

torch = pytest.importorskip("torch", reason="the [parity] extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the [parity] extra (transformers) is not installed")
hf = pytest.importorskip("deepseek_jax.interop.hf", reason="deepseek_jax.interop.hf (the HF loader) is absent")


def test_greedy_matches_transformers_generate(tmp_path):
  cfg = dsj.ModelConfig.preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)
  torch.manual_seed(0)
  hf_model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf())).eval()
  with torch.no_grad():   # a nonzero routing bias, as after training
    for layer in hf_model.model.layers[cfg.first_k_dense_replace:]:
      layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
  hf_model.save_pretrained(tmp_path)
  loaded_cfg, variables = hf.load(str(tmp_path))
  model = dsj.DeepSeekV3(loaded_cfg)

  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 6))
  new = 10
  with torch.no_grad():
    expected = hf_model.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
  expected = expected[:, prompts.shape[1]:].numpy()
  got = generate(model, variables, prompts, max_new_tokens=new, cache_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), expected)
