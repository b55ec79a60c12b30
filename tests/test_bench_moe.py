"""The MoE bench suite's routing: the skew it applies and the row it reports (tiny shapes, one run)."""

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import moe


def _routing(t=512, d=32, e=16, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  return jax.random.normal(keys[0], (t, d)), jax.random.normal(keys[1], (d, e)) / d ** 0.5


def test_skew_bias_reaches_the_target_imbalance():
  x, router = _routing()
  k = 4
  balanced = moe.load_imbalance(jax.lax.top_k(jax.nn.sigmoid(x @ router), k)[1], 16)
  for target in (1.6, 2.5):
    bias = moe.skew_bias(x, router, k, target)
    idx = jax.lax.top_k(jax.nn.sigmoid(x @ router + bias), k)[1]
    got = moe.load_imbalance(idx, 16)
    # Bisection on a step function of the spread: at or just above the target (one assignment of
    # mean 128 is 1/128 of the ratio).
    assert target <= got <= target + 0.05, (target, got)
    assert got > balanced
  with pytest.raises(ValueError, match="out of reach"):
    moe.skew_bias(x, router, k, 16 / k + 0.5)
  # Already as imbalanced as asked: no bias at all.
  assert jnp.all(moe.skew_bias(x, router, k, balanced) == 0)


def test_load_imbalance_counts_assignments():
  idx = jnp.array([[0, 1], [0, 2], [0, 3], [1, 2]])   # loads 3, 2, 2, 1: mean 2
  assert moe.load_imbalance(idx, 4) == 1.5


def test_case_reports_the_routing_and_what_capacity_drops():
  row = moe._case(256, 8, 2, 32, 16, ["blocked", "capacity_1.25"], runs=1, imbalance=2.0)
  assert 2.0 <= row["routing_imbalance"] <= 2.1
  # max load is 2x the mean, capacity 1.25x: at least the max expert's excess over capacity is dropped.
  assert row["capacity_1.25_dropped"] >= (2.0 - 1.25) / 8
  for name in ("blocked", "capacity_1.25"):
    assert row[name + "_s"] > 0 and row[name + "_vs_dense_mlp"] > 0
  assert row["dense_mlp_s"] > 0
