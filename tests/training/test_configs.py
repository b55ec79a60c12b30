"""Every experiment config builds: its ModelConfig validates, shapes come from jax.eval_shape only."""

import importlib

import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.training import model_config, schedules_from_config
from training_utils import ROOT  # noqa: F401  (puts the repository root on sys.path)

EXPECTED = {  # total parameters of the main model (count_params) and tokens per step
    "tiny": (None, 16 * 128),
    "small": ((90e6, 140e6), 64 * 1024),
    "v2_lite": ((15.5e9, 16.0e9), 4608 * 4096),
    "v3": ((671_026_419_200, 671_026_419_200), 15360 * 4096),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds(name):
  import sys
  sys.path.insert(0, ROOT)
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  cfg = model_config(config)
  counts = dsj.analysis.count_params(cfg)
  want, tokens = EXPECTED[name]
  if want is not None:
    assert want[0] <= counts["total"] <= want[1], counts["total"]
  assert config.batch_size * config.seq_len == tokens
  s = schedules_from_config(config)
  assert float(s.learning_rate(config.steps - 1)) == pytest.approx(
      config.optimizer.lr * config.optimizer.final_lr_ratio, rel=1e-5)
  if name == "v3":
    assert cfg.precision == "fp8" and cfg.dtype == "bfloat16"
    # 14.8T tokens: the ramp is 0.469T of 14.8T, the report's 2K-step warmup.
    assert config.steps * tokens == pytest.approx(14.8e12, rel=1e-4)
    # The recipe's layout runs a fixed batch (its microbatches need batches that are multiples of 15,360);
    # the report's ramp, switched on, starts at 3072 and reaches 15,360.
    assert not config.batch_ramp.enabled and s.global_batch(0) == 15360
    ramped = config.copy_and_resolve_references()
    ramped.batch_ramp.enabled = True
    r = schedules_from_config(ramped)
    assert r.global_batch(0) == 3072 and r.global_batch(config.steps // 2) == 15360
  if name == "tiny":
    # The tiny run builds for real: one forward of the initialized model is finite and near ln(V).
    import jax, jax.numpy as jnp
    model = dsj.DeepSeekV3(cfg)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    out = model.apply(v, jnp.arange(8, dtype=jnp.int32)[None])
    lse = np.asarray(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0])
    assert np.all(np.abs(lse - np.log(cfg.vocab_size)) < 0.5)
