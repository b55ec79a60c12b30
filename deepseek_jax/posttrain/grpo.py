"""The GRPO objective (DeepSeekMath section 4.1, R1 section 2.2.1) and its DAPO / Dr. GRPO variants.

For a group of G completions o_1..o_G of one prompt with rewards r_1..r_G:
1. advantages A_i = (r_i - mean(r)) / (std(r) + eps) (population std over the group); Dr. GRPO drops the
   division (A_i = r_i - mean(r)); every token of o_i gets A_i;
2. per token t of o_i, ratio rho = pi(o_it) / pi_old(o_it) and the clipped surrogate
   min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) (DAPO's clip-higher when eps_high > eps_low);
3. the KL to the frozen reference by the unbiased k3 estimator
   k3 = pi_ref / pi - log(pi_ref / pi) - 1 (>= 0 for every token);
4. per-token loss l_it = -(surrogate - beta k3), reduced by the normalization:
   'grpo'    (DeepSeekMath / R1): mean over sequences of each sequence's token mean, (1/G) sum_i 1/|o_i| sum_t;
   'dapo'    (DAPO token-level):  sum over all tokens / total tokens, 1/(sum_i |o_i|) sum_i sum_t;
   'dr_grpo' (Dr. GRPO):          sum over all tokens / (sequences x max_len), a constant denominator,
             together with unscaled advantages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("grpo", "dapo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
  """The objective's settings.

  Attributes:
    normalization: one of NORMALIZATIONS (also decides whether advantages are divided by the group std).
    clip_low: eps_low, the ratio's lower clip is 1 - clip_low.
    clip_high: eps_high, the upper clip is 1 + clip_high (DAPO: larger than clip_low).
    kl_coef: beta, the weight of the k3 KL to the reference (0: no KL term).
    max_len: the response-length budget, the 'dr_grpo' denominator per sequence.
    std_eps: added to the group std before dividing.
  """
  normalization: str = "grpo"
  clip_low: float = 0.2
  clip_high: float = 0.2
  kl_coef: float = 0.04
  max_len: int = 1
  std_eps: float = 1e-4

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}: expected one of {NORMALIZATIONS}")
    if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
      raise ValueError(f"clip_low={self.clip_low}, clip_high={self.clip_high}: need 0 <= clip_low < 1, "
                       "clip_high >= 0")
    if self.kl_coef < 0:
      raise ValueError(f"kl_coef={self.kl_coef} must be >= 0")
    if self.max_len < 1:
      raise ValueError(f"max_len={self.max_len} must be >= 1")

  @property
  def scale_advantages(self) -> bool:
    """Whether advantages are divided by the group std (all but Dr. GRPO)."""
    return self.normalization != "dr_grpo"


def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-4):
  """Group-normalized advantages.

  Args:
    rewards: [N * G] float rewards, the G completions of each prompt consecutive.
    group_size: G (>= 2).
    scale: divide by the group's (population) std + eps.
    eps: the std's offset.
  Returns:
    [N * G] float32 advantages.
  """
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: group-normalized advantages need G >= 2")
  r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + eps)
  return adv.reshape(-1)


def token_log_probs(logits, targets, temperature: float = 1.0):
  """log pi(target) [B, T] float32 of logits [B, T, V] at the sampling temperature."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def k3_kl(logp, ref_logp):
  """The unbiased per-token estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def grpo_loss(loss: GRPOLoss, logp, old_logp, ref_logp, advantages, mask):
  """The objective of one batch of completions and its statistics.

  Args:
    loss: the settings.
    logp: [B, T] log-probs of the completions' tokens under the policy being trained.
    old_logp: [B, T] under the policy that sampled them (constants).
    ref_logp: [B, T] under the frozen reference (constants; ignored when kl_coef is 0).
    advantages: [B] per-sequence advantages.
    mask: [B, T] 1 on completion tokens.
  Returns:
    (scalar loss, {'kl', 'clip_fraction', 'ratio'}) with the statistics as means over completion tokens
    ('clip_fraction': tokens whose clipped term is the one taken and differs from the unclipped).
  """
  mask = mask.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp)
  ref_logp = jax.lax.stop_gradient(ref_logp)
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
  ratio = jnp.exp(logp - old_logp)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - loss.clip_low, 1.0 + loss.clip_high) * adv
  surrogate = jnp.minimum(unclipped, clipped)
  kl = k3_kl(logp, ref_logp)
  per_token = -(surrogate - loss.kl_coef * kl) if loss.kl_coef else -surrogate
  total = jnp.maximum(mask.sum(), 1.0)
  if loss.normalization == "grpo":
    per_seq = (per_token * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    value = per_seq.mean()
  elif loss.normalization == "dapo":
    value = (per_token * mask).sum() / total
  else:
    value = (per_token * mask).sum() / (mask.shape[0] * loss.max_len)
  is_clipped = (clipped < unclipped).astype(jnp.float32)
  stats = {"kl": (kl * mask).sum() / total, "clip_fraction": (is_clipped * mask).sum() / total,
           "ratio": (ratio * mask).sum() / total}
  return value, stats
