"""A micro MoE policy shared by the post-training tests (one dense and one MoE layer, 8 routed experts), and
its scanned form (one dense layer, then two MoE layers as one `nn.scan`)."""

import pytest

MICRO = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             moe_intermediate_size=16, num_nextn_predict_layers=0, max_position_embeddings=64)


@pytest.fixture(scope="session")
def micro():
  """(model, variables) of the micro policy."""
  import jax
  import jax.numpy as jnp
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model import DeepSeekV3
  model = DeepSeekV3(ModelConfig.preset("tiny", **MICRO))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return model, variables


@pytest.fixture(scope="session")
def micro_scan():
  """(model, variables) of the micro policy with scan_layers and a second MoE layer."""
  import jax
  import jax.numpy as jnp
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.model import DeepSeekV3
  model = DeepSeekV3(ModelConfig.preset("tiny", **dict(MICRO, num_hidden_layers=3), scan_layers=True))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return model, variables
