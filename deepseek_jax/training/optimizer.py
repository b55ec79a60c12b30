"""AdamW and the report's schedules (learning rate, MTP weight, bias-update speed, batch size), scaled to a run.

Every schedule is a function of the step (a jnp scalar inside the train step, or a Python int) whose phase
boundaries are fractions of `steps` matching the report's token proportions (section 4.2, 14.8T tokens):

  learning rate: 0 -> peak linearly over warmup_fraction; peak until constant_until; cosine to
    peak * min_lr_ratio at cosine_until; peak * min_lr_ratio until tail_until; peak * final_lr_ratio after
    (report: 2.2e-4, 10T, 14.3T, 2.2e-5 for 333B, 7.3e-6 for 167B);
  MTP weight lambda: lambda_early before switch_fraction (0.3 for 10T), lambda_late after (0.1);
  bias update speed gamma: gamma before gamma_until (0.001 for 14.3T), 0 after;
  batch size (optional ramp): start_fraction x batch_size rising in whole multiples of itself to batch_size
    over ramp_fraction (3072 -> 15360 over 469B).

The optimizer is AdamW (decoupled weight decay scaled by the learning rate, as torch.optim.AdamW and
optax.adamw) after global-norm clipping; the learning rate is applied by the train step so that it follows the
train state's step (a skipped non-finite step leaves the optimizer state, and so its count, untouched).
Weight decay applies to matrices (kernels, expert weights, router gate) and not to norm scales (1-D) nor, by
default, the token embedding. Moments may be stored in bfloat16 (report section 3.3).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from deepseek_jax.training.errors import UserError


@dataclasses.dataclass(frozen=True)
class Schedules:
  """The step-dependent hyperparameters of a run (see module docstring).

  Attributes:
    steps: total optimizer steps.
    lr: peak learning rate.
    warmup_fraction, constant_until, cosine_until, tail_until: learning-rate phase ends (fractions of steps).
    min_lr_ratio: the cosine's end and the first tail's value, relative to lr.
    final_lr_ratio: the last tail's value, relative to lr.
    mtp_lambda_early, mtp_lambda_late, mtp_switch: MTP loss weight before / after the switch fraction.
    gamma, gamma_until: bias update speed, and the fraction after which it is 0.
    batch_size: the global batch (sequences) after the ramp.
    ramp: whether the batch size ramps.
    ramp_start_fraction, ramp_fraction: first batch as a fraction of batch_size; ramp length.
  """
  steps: int
  lr: float = 2.2e-4
  warmup_fraction: float = 0.0085
  constant_until: float = 10.0 / 14.8
  cosine_until: float = 14.3 / 14.8
  tail_until: float = 14.633 / 14.8
  min_lr_ratio: float = 0.1
  final_lr_ratio: float = 7.3e-6 / 2.2e-4
  mtp_lambda_early: float = 0.3
  mtp_lambda_late: float = 0.1
  mtp_switch: float = 10.0 / 14.8
  gamma: float = 0.001
  gamma_until: float = 14.3 / 14.8
  batch_size: int = 1
  ramp: bool = False
  ramp_start_fraction: float = 0.2
  ramp_fraction: float = 0.469 / 14.8

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"steps={self.steps} must be >= 1")
    bounds = [self.warmup_fraction, self.constant_until, self.cosine_until, self.tail_until]
    if not (0.0 <= bounds[0] <= bounds[1] <= bounds[2] <= bounds[3] <= 1.0):
      raise ValueError("learning-rate phases must satisfy 0 <= warmup_fraction <= constant_until <= "
                       f"cosine_until <= tail_until <= 1, got {bounds}")
    if not 0.0 < self.ramp_start_fraction <= 1.0:
      raise ValueError(f"batch_ramp.start_fraction={self.ramp_start_fraction} must be in (0, 1]")

  def _bound(self, fraction: float) -> float:
    return fraction * self.steps

  def learning_rate(self, step):
    """Learning rate of the update made at `step` (0-based); jnp scalar for a jnp step."""
    s = jnp.asarray(step, jnp.float32)
    peak = self.lr
    w, c1 = self._bound(self.warmup_fraction), self._bound(self.constant_until)
    c2, c3 = self._bound(self.cosine_until), self._bound(self.tail_until)
    # Warmup reaches peak at the update numbered w (the first update gets peak / w, never 0).
    warm = peak * jnp.minimum((s + 1.0) / max(w, 1.0), 1.0) if w > 0 else jnp.float32(peak)
    progress = jnp.clip((s - c1) / max(c2 - c1, 1e-9), 0.0, 1.0)
    lo = peak * self.min_lr_ratio
    cosine = lo + (peak - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    lr = jnp.where(s < w, warm, jnp.where(s < c1, peak, jnp.where(s < c2, cosine, lo)))
    return jnp.where(s < c3, lr, peak * self.final_lr_ratio).astype(jnp.float32)

  def mtp_lambda(self, step):
    """MTP loss weight at `step`."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.where(s < self._bound(self.mtp_switch), self.mtp_lambda_early,
                     self.mtp_lambda_late).astype(jnp.float32)

  def bias_gamma(self, step):
    """Router-bias update speed at `step`."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.where(s < self._bound(self.gamma_until), self.gamma, 0.0).astype(jnp.float32)

  def global_batch(self, step: int, quantum: int = 1) -> int:
    """Global batch (sequences) at Python int `step`: whole multiples of the first batch, rounded down to a
    multiple of `quantum` (the data-parallel size times the accumulation steps), never below quantum.

    Args:
      step: the step.
      quantum: every batch is a multiple of this.
    Returns:
      An int.
    """
    if not self.ramp:
      return self.batch_size
    first = max(int(round(self.batch_size * self.ramp_start_fraction)), 1)
    ramp_steps = self._bound(self.ramp_fraction)
    if step >= ramp_steps:
      return self.batch_size
    levels = max(self.batch_size // first, 1)
    level = 1 + int(math.floor((levels - 1) * step / max(ramp_steps, 1e-9)))
    size = min(level * first, self.batch_size)
    return max(size // quantum * quantum, quantum)


def _layer_rank(path: tuple, leaf) -> int:
  """Rank of one layer's parameter: scanned runs ('layers_{a}_to_{b}', ModelConfig.scan_layers) stack
  their layers along a leading axis that does not count."""
  return leaf.ndim - 1 if re.fullmatch(r"layers_\d+_to_\d+", str(path[0])) else leaf.ndim


def decay_mask(params, decay_embeddings: bool = False):
  """True for parameters that get weight decay: arrays of rank >= 2 (per layer, for scanned layers), the
  embedding only if asked.

  Args:
    params: the parameter pytree (nested dicts).
    decay_embeddings: also decay embed_tokens.
  Returns:
    A pytree of bools with the structure of params.
  """
  flat = traverse_util.flatten_dict(params)
  mask = {k: (_layer_rank(k, v) >= 2 and (decay_embeddings or "embed_tokens" not in k))
          for k, v in flat.items()}
  return traverse_util.unflatten_dict(mask)


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                  moment_dtype: Any = jnp.float32) -> optax.GradientTransformation:
  """Adam's bias-corrected m / (sqrt(v) + eps), with both moments stored in `moment_dtype` (math in fp32).

  Args:
    b1, b2: moment decay rates.
    eps: denominator offset.
    moment_dtype: storage dtype of mu and nu (bfloat16 halves the optimizer memory; report section 3.3).
  Returns:
    An optax GradientTransformation.
  """
  moment_dtype = jnp.dtype(moment_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                            jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, g32)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, g32)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    updates = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                           mu, nu, grads)
    cast = lambda t: jax.tree.map(lambda x: x.astype(moment_dtype), t)
    return updates, ScaleByAdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(params, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, mu_dtype: str = "float32",
                   decay_embeddings: bool = False) -> optax.GradientTransformation:
  """AdamW without the learning-rate factor: clip -> Adam -> + weight_decay * param (masked).

  The train step multiplies the result by -learning_rate(step); together that is exactly optax.adamw.

  Args:
    params: parameter pytree (for the decay mask).
    b1, b2, eps: Adam.
    weight_decay: decoupled decay coefficient (report: 0.1).
    clip_norm: global gradient-norm clip (report: 1.0); <= 0 disables it.
    mu_dtype: storage dtype of both moments ('float32' or 'bfloat16').
    decay_embeddings: decay the token embedding too.
  Returns:
    An optax GradientTransformation.
  """
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(scale_by_adam(b1, b2, eps, mu_dtype))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, decay_mask(params, decay_embeddings)))
  return optax.chain(*parts)


def schedules_from_config(config) -> Schedules:
  """Schedules of an experiment ConfigDict (see `deepseek_jax.training.config`)."""
  o = config.optimizer
  return Schedules(
      steps=int(config.steps), lr=float(o.lr), warmup_fraction=float(o.warmup_fraction),
      constant_until=float(o.constant_until), cosine_until=float(o.cosine_until),
      tail_until=float(o.tail_until), min_lr_ratio=float(o.min_lr_ratio),
      final_lr_ratio=float(o.final_lr_ratio), mtp_lambda_early=float(config.mtp.lambda_early),
      mtp_lambda_late=float(config.mtp.lambda_late), mtp_switch=float(config.mtp.switch_fraction),
      gamma=float(config.balance.gamma), gamma_until=float(config.balance.gamma_until),
      batch_size=int(config.batch_size), ramp=bool(config.batch_ramp.enabled),
      ramp_start_fraction=float(config.batch_ramp.start_fraction),
      ramp_fraction=float(config.batch_ramp.ramp_fraction))


def _number(config, name: str) -> float:
  node = config
  for part in name.split("."):
    node = node[part]
  if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
    raise UserError(f"config.{name}={node!r} must be a finite number")
  return float(node)


def check_optimizer_config(config) -> None:
  """Checks the optimizer's and the schedules' values of an experiment ConfigDict before anything runs.

  lr >= 0 (0: the parameters keep their values) and finite in float32; b1, b2 in [0, 1); eps > 0;
  weight_decay, clip_norm (0 = no clipping), min_lr_ratio, final_lr_ratio, the MTP weights, balance.alpha
  and balance.gamma >= 0; every fraction in [0, 1] with warmup_fraction <= constant_until <= cosine_until
  <= tail_until; batch_ramp.start_fraction in (0, 1]. All finite.

  Raises:
    UserError: naming the first field that is out of range.
  """
  def check(name, ok, want):
    v = _number(config, name)
    if not ok(v):
      raise UserError(f"config.{name}={v!r} must be {want}")

  check("optimizer.lr", lambda v: 0 <= v <= float(jnp.finfo(jnp.float32).max), ">= 0 and finite in float32")
  for name in ("optimizer.b1", "optimizer.b2"):
    check(name, lambda v: 0 <= v < 1, "in [0, 1)")
  check("optimizer.eps", lambda v: v > 0, "> 0")
  for name in ("optimizer.weight_decay", "optimizer.clip_norm", "optimizer.min_lr_ratio",
               "optimizer.final_lr_ratio", "mtp.lambda_early", "mtp.lambda_late", "balance.alpha",
               "balance.gamma"):
    check(name, lambda v: v >= 0, ">= 0")
  phases = ("optimizer.warmup_fraction", "optimizer.constant_until", "optimizer.cosine_until",
            "optimizer.tail_until")
  for name in phases + ("mtp.switch_fraction", "balance.gamma_until", "batch_ramp.ramp_fraction"):
    check(name, lambda v: 0 <= v <= 1, "in [0, 1]")
  for a, b in zip(phases, phases[1:]):
    if _number(config, a) > _number(config, b):
      raise UserError(f"config.{a}={_number(config, a)} must be <= config.{b}={_number(config, b)}")
  check("batch_ramp.start_fraction", lambda v: 0 < v <= 1, "in (0, 1]")
