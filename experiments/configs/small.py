"""About 100M parameters (the 'small' preset) for one GPU: BPE over the Python standard library, bf16 compute."""

from deepseek_jax.training.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "small"
  c.data.tokenizer = "bpe"          # trained to the model's 32768-entry vocabulary on the corpus, cached
  c.precision = "bf16"
  c.steps = 5000
  c.batch_size = 64
  c.seq_len = 1024
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval_every = 500
  c.eval_batches = 8
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_fraction = 0.02
  c.sample.num = 3
  return c
