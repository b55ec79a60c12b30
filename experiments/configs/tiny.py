"""The default experiment: a 0.2M-parameter DeepSeek-V3 (MLA, 8 routed experts, MTP) on the Python standard
library, byte-level, trained on a laptop CPU in a few minutes.

The schedules keep the report's shape (warmup, constant, cosine, two tails; MTP weight and bias-speed
switches), scaled to `steps`; the warmup is longer than the report's 0.85% because a few hundred steps need
it, and the learning rate and balance speed are those of a model this small.
"""

from deepseek_jax.training.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "tiny"
  c.model.vocab_size = 259           # the byte tokenizer's 256 bytes + pad/bos/eos
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_batches = 4
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_fraction = 0.05
  c.balance.gamma = 0.01
  c.sample.num = 3
  return c
