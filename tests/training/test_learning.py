"""Short real runs on the default corpus: the loss falls, and the bias update balances the experts."""

import numpy as np
import pytest

from deepseek_jax.training import read_metrics, train
from training_utils import micro_config

STEPS = 60


def _run(tmp_path, name, gamma):
  wd = tmp_path / name
  summary = train(micro_config(steps=STEPS, balance__gamma=gamma, checkpoint_every=0, log_every=1), str(wd))
  return summary, [r for r in read_metrics(wd) if "loss" in r]


@pytest.mark.slow
def test_loss_falls_and_bias_update_balances_load(tmp_path):
  summary, with_bias = _run(tmp_path, "gamma", 0.01)
  _, without = _run(tmp_path, "no_gamma", 0.0)
  ce = [r["ce"] for r in with_bias]
  # Byte-level text starts at ln(259) = 5.56 nats; 60 steps of this model reach about 3.
  assert ce[0] > 5.0
  assert np.mean(ce[-5:]) < ce[0] - 1.8, (ce[0], ce[-5:])
  assert summary["step"] == STEPS and summary["stopped"] == "done"
  # Expert-load imbalance (max / mean load per MoE layer, then the mean over layers) over the last 20 steps.
  imb = lambda recs: float(np.mean([r["imbalance_mean"] for r in recs[-20:]]))
  print(f"imbalance over the last 20 steps: gamma=0.01 {imb(with_bias):.3f}, gamma=0 {imb(without):.3f}")
  assert imb(with_bias) < imb(without) - 0.1, (imb(with_bias), imb(without))
  assert without[-1]["bias_absmax"] == 0.0 and with_bias[-1]["bias_absmax"] > 0.0
