"""The GRPO objective and advantages against a NumPy transcription of the papers' formulas.

DeepSeekMath eq. 3 / R1 eq. 1 (per-sequence token mean, then mean over the group), DAPO eq. 8 (token-level sum
over the batch / total tokens, decoupled clip range), Dr. GRPO (constant denominator, advantages not divided by
the std); the KL by Schulman's k3 estimator (DeepSeekMath eq. 4).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from deepseek_jax.posttrain import GRPOLoss, group_advantages, grpo_loss, k3_kl, token_log_probs


def np_advantages(rewards, g, scale, eps):
  out = np.empty(len(rewards))
  for start in range(0, len(rewards), g):
    r = np.asarray(rewards[start:start + g], np.float64)
    a = r - r.mean()
    if scale:
      a = a / (np.sqrt(((r - r.mean()) ** 2).mean()) + eps)
    out[start:start + g] = a
  return out


def np_objective(logp, old, ref, adv, mask, *, norm, eps_low, eps_high, beta, max_len):
  """Loop over sequences and tokens, one formula term at a time."""
  b, t = logp.shape
  per_seq, total, n_tok, clipped_tok, kl_sum = [], 0.0, 0.0, 0.0, 0.0
  for i in range(b):
    seq_sum, seq_n = 0.0, 0.0
    for j in range(t):
      if not mask[i, j]:
        continue
      rho = np.exp(logp[i, j] - old[i, j])
      lo, hi = 1 - eps_low, 1 + eps_high
      rho_c = min(max(rho, lo), hi)
      surr = min(rho * adv[i], rho_c * adv[i])
      clipped_tok += float(rho_c * adv[i] < rho * adv[i])
      q = np.exp(ref[i, j]) / np.exp(logp[i, j])        # pi_ref / pi_theta
      kl = q - np.log(q) - 1
      kl_sum += kl
      term = surr - beta * kl
      seq_sum += term
      seq_n += 1
    per_seq.append(seq_sum / max(seq_n, 1))
    total += seq_sum
    n_tok += seq_n
  if norm == "grpo":
    obj = np.mean(per_seq)
  elif norm == "dapo":
    obj = total / n_tok
  else:
    obj = total / (b * max_len)
  return -obj, kl_sum / n_tok, clipped_tok / n_tok


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  b, t = 8, 7
  logp = np.log(rng.uniform(0.05, 0.95, (b, t)))
  old = logp + rng.normal(0, 0.3, (b, t))            # ratios well outside [0.8, 1.2] for some tokens
  ref = logp + rng.normal(0, 0.5, (b, t))
  lengths = rng.integers(1, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
  rewards = rng.integers(0, 2, b).astype(np.float64) + rng.uniform(0, 0.1, b)
  return logp, old, ref, mask, rewards


@pytest.mark.parametrize("norm,eps_low,eps_high,beta", [("grpo", 0.2, 0.2, 0.04), ("dapo", 0.2, 0.28, 0.0),
                                                         ("dr_grpo", 0.1, 0.3, 0.1)])
def test_objective_matches_papers(batch, norm, eps_low, eps_high, beta):
  logp, old, ref, mask, rewards = batch
  g = 4
  cfg = GRPOLoss(norm, eps_low, eps_high, beta, max_len=9)
  adv = np.asarray(group_advantages(rewards, g, scale=cfg.scale_advantages, eps=cfg.std_eps))
  want_adv = np_advantages(rewards, g, norm != "dr_grpo", cfg.std_eps)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  value, stats = grpo_loss(cfg, jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                           jnp.asarray(ref, jnp.float32), jnp.asarray(adv), jnp.asarray(mask))
  want, want_kl, want_clip = np_objective(logp, old, ref, want_adv, mask, norm=norm, eps_low=eps_low,
                                          eps_high=eps_high, beta=beta, max_len=9)
  np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(stats["kl"]), want_kl, rtol=1e-5)
  np.testing.assert_allclose(float(stats["clip_fraction"]), want_clip, rtol=1e-6)
  assert 0 < want_clip < 1        # the batch exercises both branches of the clip


def test_gradient_vanishes_where_clipped(batch):
  """Tokens whose clipped term is taken carry no policy gradient (DeepSeekMath eq. 3's min)."""
  logp, old, _, mask, rewards = batch
  cfg = GRPOLoss("dapo", 0.2, 0.2, 0.0)
  adv = group_advantages(rewards, 4)
  grad = jax.grad(lambda lp: grpo_loss(cfg, lp, jnp.asarray(old, jnp.float32), jnp.zeros_like(lp), adv,
                                       jnp.asarray(mask))[0])(jnp.asarray(logp, jnp.float32))
  rho = np.exp(logp - old)
  a = np.asarray(adv)[:, None]
  clipped = ((rho > 1.2) & (a > 0)) | ((rho < 0.8) & (a < 0))
  assert np.all(np.asarray(grad)[clipped & (mask > 0)] == 0)
  assert np.all(np.asarray(grad)[~clipped & (mask > 0) & (a != 0)] != 0)
  assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_k3_and_log_probs():
  logp = jnp.log(jnp.array([0.2, 0.5, 0.9]))
  ref = jnp.log(jnp.array([0.4, 0.5, 0.3]))
  q = np.array([0.4, 0.5, 0.3]) / np.array([0.2, 0.5, 0.9])
  np.testing.assert_allclose(k3_kl(logp, ref), q - np.log(q) - 1, rtol=1e-5)
  assert float(k3_kl(logp, logp).max()) == 0.0
  logits = jnp.array([[[1.0, 2.0, 0.5]]])
  t = 0.7
  p = np.exp(np.array([1.0, 2.0, 0.5]) / t)
  np.testing.assert_allclose(token_log_probs(logits, jnp.array([[1]]), t), [[np.log(p[1] / p.sum())]],
                             rtol=1e-6)


def test_bad_settings():
  with pytest.raises(ValueError, match="G >= 2"):
    group_advantages(np.zeros(4), 1)
  with pytest.raises(ValueError, match="normalization"):
    GRPOLoss("mean")
