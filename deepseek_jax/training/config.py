"""The experiment configuration: one `ml_collections.ConfigDict` schema shared by every training config.

`default_config()` lists every field `--config.X` may set; `experiments/configs/*.py` start from it and
change values.  `model_config(config)` turns `config.model` (a preset name plus optional overrides of any
`ModelConfig` field) and `config.precision` into the frozen `ModelConfig` the model takes.

Fields (defaults are the DeepSeek-V3 recipe, report sections 3-4, scaled to `steps`):
  model.preset, model.<ModelConfig field>   (None: the preset's value)
  data.path ('' = the Python standard library), data.tokenizer ('byte' | 'bpe' | tokenizer path),
  data.cache_dir ('' = default), seed, steps, batch_size (global sequences), seq_len, grad_accum,
  log_every, checkpoint_every, eval_every, eval_batches, max_to_keep, max_bad_steps, precision,
  mesh.{data,fsdp,expert,tensor} (-1: the remaining devices), zero1 (AdamW moments also split over 'data'),
  optimizer.{lr, b1, b2, eps, weight_decay, clip_norm, mu_dtype, decay_embeddings, warmup_fraction,
    constant_until, cosine_until, tail_until, final_lr_ratio, min_lr_ratio},
  mtp.{lambda_early, lambda_late, switch_fraction}, balance.{alpha, gamma, gamma_until},
  batch_ramp.{enabled, start_fraction, ramp_fraction}, sample.{num, length, temperature, prompt}.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ml_collections import config_dict

from deepseek_jax.config import ModelConfig
from deepseek_jax.training.errors import UserError

# Report section 4.2: 14.8T tokens; LR constant until 10T, cosine until 14.3T, 2.2e-5 until 14.633T,
# 7.3e-6 for the last 167B. Warmup: 2K of about 14.8T / (15360 x 4096) = 235K steps.
TOTAL_TOKENS = 14.8e12
REPORT_STEPS = TOTAL_TOKENS / (15360 * 4096)
WARMUP_FRACTION = 2000 / REPORT_STEPS
CONSTANT_UNTIL = 10.0e12 / TOTAL_TOKENS
COSINE_UNTIL = 14.3e12 / TOTAL_TOKENS
TAIL_UNTIL = (14.3e12 + 333e9) / TOTAL_TOKENS
MIN_LR_RATIO = 2.2e-5 / 2.2e-4
FINAL_LR_RATIO = 7.3e-6 / 2.2e-4
MTP_SWITCH = 10.0e12 / TOTAL_TOKENS
GAMMA_UNTIL = 14.3e12 / TOTAL_TOKENS
RAMP_FRACTION = 469e9 / TOTAL_TOKENS
RAMP_START = 3072 / 15360

# ModelConfig fields that a flag may override (rope_scaling is a nested dataclass: set it through a preset).
_SKIP_FIELDS = ("rope_scaling",)


def _placeholder_type(field: dataclasses.Field) -> type:
  hint = typing.get_type_hints(ModelConfig)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def model_fields() -> list[str]:
  """Names of the ModelConfig fields that `config.model.<name>` may override."""
  return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _SKIP_FIELDS]


def default_config() -> config_dict.ConfigDict:
  """Every experiment field with its default (the report's recipe; model = the 'tiny' preset).

  Returns:
    A ConfigDict; `model.<field>` entries are None placeholders meaning "the preset's value".
  """
  c = config_dict.ConfigDict()
  c.model = config_dict.ConfigDict()
  c.model.preset = "tiny"
  hints = {f.name: f for f in dataclasses.fields(ModelConfig)}
  for name in model_fields():
    c.model[name] = config_dict.placeholder(_placeholder_type(hints[name]))

  c.data = config_dict.ConfigDict()
  c.data.path = ""
  c.data.tokenizer = "byte"
  c.data.cache_dir = ""

  c.seed = 0
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.grad_accum = 1
  c.precision = "fp32"
  c.log_every = 10
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_batches = 4
  c.max_to_keep = 3
  c.max_bad_steps = 5
  c.progress = True

  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  # ZeRO-1: the optimizer state is split over the 'data' replicas too (parameters and gradients are not).
  c.zero1 = False

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.lr = 2.2e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0
  c.optimizer.mu_dtype = "float32"
  c.optimizer.decay_embeddings = False
  c.optimizer.warmup_fraction = WARMUP_FRACTION
  c.optimizer.constant_until = CONSTANT_UNTIL
  c.optimizer.cosine_until = COSINE_UNTIL
  c.optimizer.tail_until = TAIL_UNTIL
  c.optimizer.min_lr_ratio = MIN_LR_RATIO
  c.optimizer.final_lr_ratio = FINAL_LR_RATIO

  c.mtp = config_dict.ConfigDict(dict(lambda_early=0.3, lambda_late=0.1, switch_fraction=MTP_SWITCH))
  c.balance = config_dict.ConfigDict(dict(alpha=0.0001, gamma=0.001, gamma_until=GAMMA_UNTIL))
  c.batch_ramp = config_dict.ConfigDict(dict(enabled=False, start_fraction=RAMP_START,
                                             ramp_fraction=RAMP_FRACTION))
  c.sample = config_dict.ConfigDict(dict(num=0, length=120, temperature=0.8, prompt="def "))
  # Profile `steps` steps from the one that starts at start_step (after the compiling first step by
  # default) into workdir/profile: the jax profiler trace and the op times by module (0 steps: off).
  c.profile = config_dict.ConfigDict(dict(start_step=1, steps=0))
  return c


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
  """The ModelConfig of an experiment: preset, then the non-None `model.*` overrides, then `precision`.

  Args:
    config: an experiment ConfigDict (see `default_config`).
  Returns:
    The validated ModelConfig.
  Raises:
    UserError: unknown preset, unknown field, or an invalid value (the message names it).
  """
  m = config.model
  overrides: dict[str, Any] = {}
  known = set(model_fields())
  for name, value in m.items():
    if name == "preset" or value is None:
      continue
    if name not in known:
      raise UserError(f"config.model.{name}: not a ModelConfig field")
    overrides[name] = value
  precision = config.precision
  if precision not in ("fp32", "bf16", "fp8"):
    raise UserError(f"config.precision={precision!r}: expected one of 'fp32', 'bf16', 'fp8'")
  if precision != "fp32":
    # bf16 / fp8 compute with fp32 master weights (report section 3.3).
    overrides.setdefault("dtype", "bfloat16")
    overrides.setdefault("precision", precision)
  try:
    return ModelConfig.preset(m.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise UserError(f"config.model: {e}") from e
