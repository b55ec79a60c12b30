"""--init_from: a run starts from the variables of a converted (orbax) checkpoint."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import DeepSeekV3, interop
from deepseek_jax.inference.loading import load_workdir
from deepseek_jax.training import config as train_config
from deepseek_jax.training import train
from deepseek_jax.training.errors import UserError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_utils import micro_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_init_from_loads_the_converted_variables(tmp_path):
  # lr 0 and gamma 0: the run must end exactly on the variables it started from.
  config = micro_config(steps=1, checkpoint_every=1, optimizer__lr=0.0, balance__gamma=0.0)
  cfg = train_config.model_config(config)
  variables = DeepSeekV3(cfg).init(jax.random.PRNGKey(123), jnp.zeros((1, 4), jnp.int32))
  variables = jax.tree.map(lambda x: 1.5 * x + 0.01, variables)      # nothing an init would give
  interop.save_orbax(str(tmp_path / "converted"), cfg, variables)
  train(config, str(tmp_path / "run"), init_from=str(tmp_path / "converted"))
  _, restored, step = load_workdir(str(tmp_path / "run"), cfg)
  assert step == 1
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_init_from_errors(tmp_path):
  config = micro_config(steps=1)
  with pytest.raises(UserError, match="no such directory"):
    train(config, str(tmp_path / "run"), init_from=str(tmp_path / "missing"))
  other = train_config.model_config(micro_config(steps=1, model__hidden_size=48))
  interop.save_orbax(str(tmp_path / "other"), other,
                     DeepSeekV3(other).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  with pytest.raises(UserError, match="init_from"):
    train(config, str(tmp_path / "run2"), init_from=str(tmp_path / "other"))
