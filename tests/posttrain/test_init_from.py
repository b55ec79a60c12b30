"""SFT starts from a training run's newest checkpoint (its MTP modules dropped) and from an HF checkpoint of
the same variables: the policy's initial weights are the run's."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import interop
from deepseek_jax.inference.loading import load_workdir
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.posttrain import run as run_lib
from deepseek_jax.posttrain.config import default_config
from deepseek_jax.training import train
from deepseek_jax.training.config import model_config
from deepseek_jax.training.errors import UserError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
from training_utils import MICRO, micro_config  # noqa: E402  pylint: disable=g-import-not-at-top


def _sft_config(init_from, data):
  c = default_config()
  c.model.preset = "tiny"
  for key, value in MICRO.items():
    if key.startswith("model."):
      c.model[key.split(".", 1)[1]] = value
  c.model.num_nextn_predict_layers = 0
  c.init_from = init_from
  c.progress = False
  c.checkpoint_every = 0
  c.sft.update(steps=1, batch_size=2, seq_len=16, lr=0.0, data=data)   # lr 0: the policy stays as loaded
  return c


def _assert_equal(want, got):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_sft_starts_from_a_training_run_and_an_hf_checkpoint(tmp_path):
  run = str(tmp_path / "run")
  train(micro_config(steps=2, checkpoint_every=2), run)          # MTP depth 1, as training runs have
  run_cfg, run_vars, step = load_workdir(run)
  assert step == 2 and run_cfg.num_nextn_predict_layers == 1
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(4)))

  config = _sft_config(run, str(data))
  summary = run_lib.run_sft(config, str(tmp_path / "sft"))
  assert summary["step"] == 1
  cfg = model_config(config)
  _, policy, _ = load_workdir(str(tmp_path / "sft"), cfg)
  main = {c: {k: v for k, v in run_vars[c].items() if not k.startswith("mtp")} for c in ("params", "router")}
  assert jax.tree_util.tree_structure(policy) == jax.tree_util.tree_structure(main)
  _assert_equal(main, policy)

  interop.hf.save(str(tmp_path / "hf"), run_cfg, run_vars)
  from_hf = run_lib._initial_variables(_sft_config(str(tmp_path / "hf"), str(data)), DeepSeekV3(cfg))
  _assert_equal(main, from_hf)


def test_init_from_that_does_not_fit_is_one_line(tmp_path):
  config = _sft_config(str(tmp_path / "missing"), "")
  model = DeepSeekV3(model_config(config))
  with pytest.raises(UserError, match="no such directory"):
    run_lib._initial_variables(config, model)
  wide = dataclasses.replace(model_config(config), hidden_size=48)
  shapes = jax.eval_shape(DeepSeekV3(wide).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  interop.save_orbax(str(tmp_path / "wide"), wide, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
  with pytest.raises(UserError, match=r"config.init_from=.*wide: .*shape") as e:
    run_lib._initial_variables(_sft_config(str(tmp_path / "wide"), ""), model)
  assert "\n" not in str(e.value)
