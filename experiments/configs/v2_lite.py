"""DeepSeek-V2-Lite pre-training, for planning: 15.7B parameters, 5.7T tokens, sequence 4096, batch 4608,
peak learning rate 4.2e-4 (DeepSeek-V2 report, appendix B). The learning-rate curve is this codebase's
V3-shaped schedule; V2 used step decays (x0.316 at 80% and 90% of training) instead. Not meant to run on CPU.
"""

from deepseek_jax.training.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "deepseek-v2-lite"
  c.data.tokenizer = "bpe"
  c.precision = "bf16"
  c.seq_len = 4096
  c.batch_size = 4608
  c.steps = int(round(5.7e12 / (4608 * 4096)))  # 302,003
  c.optimizer.lr = 4.2e-4
  c.optimizer.warmup_fraction = 2000 / c.steps
  c.balance.gamma = 0.0                         # V2 routing has no correction bias
  c.mesh.data = -1
  c.mesh.expert = 8
  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 5000
  return c
