"""SFT of a tiny DeepSeek-V3 (MLA, 8 routed experts) on the ChainSum task's worked solutions, byte-level."""

from deepseek_jax.posttrain.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "tiny"
  c.model.num_nextn_predict_layers = 0   # post-training trains the main model only
  c.sft.steps = 200
  c.sft.batch_size = 32
  c.sft.lr = 3e-3
  return c
