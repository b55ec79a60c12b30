"""The post-training experiment schema: one `ml_collections.ConfigDict` for SFT and GRPO runs.

`default_config()` lists every field; `experiments/configs/sft_tiny.py` and `grpo_tiny.py` change values.
  model.preset, model.<ModelConfig field>, precision     (as in `training.config`)
  seed, init_from ('' = a fresh model; else a run workdir, an HF checkpoint or a converted orbax checkpoint
    directory; its MTP modules are dropped when the policy has none)
  task.{terms, max_value, eval_fraction, teacher_error, problems}  (the ChainSum task; teacher_error: the
    share of SFT demonstrations whose last addition is one too high; problems: a JSONL of {'prompt',
    'answer'} that replaces the task for GRPO)
  sft.{steps, batch_size, seq_len, lr, data ('' = the task's worked solutions), examples (how many)}
  grpo.{steps, prompts_per_step, group_size, max_new_tokens, prompt_len, temperature, epochs, minibatches,
    lr, normalization ('grpo' | 'dapo' | 'dr_grpo'), clip_low, clip_high, kl_coef, replay ('auto' = on for
    MoE policies | 'on' | 'off'), replay_weights}
  rewards.{names, weights}  (comma-separated: built-in names or 'module:function'; one weight each)
  balance.{alpha (sequence-wise balance loss weight, 0 = off), gamma (routing-bias speed, 0 = frozen)}
  optimizer.{b1, b2, eps, weight_decay, clip_norm}
  log_every, eval_every, eval_problems, eval_batch, checkpoint_every, max_to_keep, progress,
  mesh.{data, fsdp, expert, tensor}
"""

from __future__ import annotations

from ml_collections import config_dict

from deepseek_jax.training.config import default_config as training_default_config


def default_config() -> config_dict.ConfigDict:
  """Every post-training field with its default."""
  c = config_dict.ConfigDict()
  c.model = training_default_config().model
  c.model.vocab_size = 259                  # the byte tokenizer
  c.precision = "fp32"
  c.seed = 0
  c.init_from = ""

  c.task = config_dict.ConfigDict(dict(terms=3, max_value=9, eval_fraction=0.2, teacher_error=0.0,
                                       problems=""))
  c.sft = config_dict.ConfigDict(dict(steps=200, batch_size=32, seq_len=64, lr=3e-3, data="",
                                      examples=4096))
  c.grpo = config_dict.ConfigDict(dict(
      steps=100, prompts_per_step=8, group_size=8, max_new_tokens=56, prompt_len=12, temperature=1.0,
      epochs=1, minibatches=2, lr=1e-3, normalization="grpo", clip_low=0.2, clip_high=0.2, kl_coef=0.04,
      replay="auto", replay_weights=False))
  c.rewards = config_dict.ConfigDict(dict(names="answer,format", weights="1.0,0.1"))
  c.balance = config_dict.ConfigDict(dict(alpha=0.0, gamma=0.0))
  c.optimizer = config_dict.ConfigDict(dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  c.log_every = 1
  c.eval_every = 25
  c.eval_problems = 64
  c.eval_batch = 64
  c.checkpoint_every = 25
  c.max_to_keep = 2
  c.progress = True
  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  return c
