"""GRPO on the ChainSum task (3 numbers in 0..6) after a brief SFT of a tiny DeepSeek-V3 (MLA, 8 routed
experts: routing replay on) on demonstrations from a noisy teacher (60% slip in the last addition), on a
laptop CPU in minutes: held-out greedy accuracy rises as the reward alone corrects the slip."""

from deepseek_jax.posttrain.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "tiny"
  c.model.num_nextn_predict_layers = 0   # post-training trains the main model only
  c.task.terms = 3
  c.task.max_value = 6
  c.task.teacher_error = 0.6
  c.sft.steps = 200
  c.sft.batch_size = 32
  c.sft.lr = 3e-3
  c.grpo.steps = 60
  c.grpo.prompts_per_step = 8
  c.grpo.group_size = 8
  c.grpo.max_new_tokens = 48
  c.grpo.prompt_len = 8
  c.grpo.lr = 3e-4
  c.eval_problems = 32
  c.eval_batch = 32
  c.eval_every = 20
  c.checkpoint_every = 20
  return c
