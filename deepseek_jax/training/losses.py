"""The training objective: next-token cross-entropy + lambda x MTP loss + alpha x sequence-wise balance loss.

  L = CE(logits, targets) + lambda * (1/D) sum_k CE_k + alpha * mean_l balance_l      (report eqs. 17, 24-25)

CE_k is the depth-k MTP cross-entropy: position i of depth k predicts token i + k + 1, which is
targets[:, i + k]; the last k positions have no target inside the window and are masked out.
balance_l is the model's sequence-wise sum_i f_i P_i of MoE layer l (main layers and MTP blocks), averaged over
the layers. Every mean is over the tokens that have a target, so a global batch split into equal microbatches
gives the same loss.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, mask: Optional[jax.Array] = None):
  """Sum and count of the token cross-entropies (nats).

  Args:
    logits: [B, S, V] (any float dtype; computed in float32).
    targets: int [B, S].
    mask: optional [B, S] bool/float weights (1 = counted).
  Returns:
    (sum of -log p(target), number of counted tokens), float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = logz - picked
  if mask is None:
    return nll.sum(), jnp.float32(nll.size)
  mask = mask.astype(jnp.float32)
  return (nll * mask).sum(), mask.sum()


def mtp_cross_entropy(mtp_logits, targets):
  """Per-depth (sum, count) of the MTP cross-entropies.

  Args:
    mtp_logits: tuple over depths k = 1..D of [B, S, V]; position i of depth k predicts token i + k + 1.
    targets: int [B, S], targets[:, i] = token i + 1.
  Returns:
    list over depths of (sum, count); depth k counts the S - k positions that have a target.
  """
  out = []
  s = targets.shape[1]
  for k, logits in enumerate(mtp_logits, start=1):
    shifted = jnp.concatenate([targets[:, k:], jnp.zeros_like(targets[:, :k])], axis=1)[:, :s]
    mask = jnp.broadcast_to(jnp.arange(s) < s - k, targets.shape)
    out.append(cross_entropy(logits, shifted, mask))
  return out


def objective(out, targets, *, mtp_lambda, alpha: float):
  """The training loss of one batch and its parts.

  Args:
    out: a ModelOutput (logits, mtp_logits, balance_loss).
    targets: int [B, S].
    mtp_lambda: MTP weight (scalar, may be traced).
    alpha: balance-loss weight.
  Returns:
    (loss, parts) with parts = {'ce', 'mtp', 'balance'} float32 scalars ('mtp' the mean over depths of the
    per-depth mean CE, 'balance' the mean over MoE layers); 0 for absent parts.
  """
  ce_sum, ce_n = cross_entropy(out.logits, targets)
  ce = ce_sum / ce_n
  mtp = jnp.float32(0.0)
  if out.mtp_logits:
    depths = mtp_cross_entropy(out.mtp_logits, targets)
    mtp = sum(s / jnp.maximum(n, 1.0) for s, n in depths) / len(depths)
  balance = jnp.float32(0.0)
  if out.balance_loss is not None:
    balance = jnp.mean(out.balance_loss.astype(jnp.float32))
  loss = ce + mtp_lambda * mtp + alpha * balance
  return loss, {"ce": ce, "mtp": mtp, "balance": balance}
