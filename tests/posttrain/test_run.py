"""The GRPO loop: a resumed run equals an uninterrupted one; bad input is a one-line UserError (exit 2)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax.posttrain import default_config, run_grpo
from deepseek_jax.training import UserError
from deepseek_jax.training.checkpoint import Checkpointer
from tests.posttrain.conftest import MICRO

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def length_reward(completion, answer):  # pylint: disable=unused-argument
  """A dense reward for an untrained policy: varies with the completion."""
  return float(len(completion) % 3)


def broken_reward(completion, answer):
  raise KeyError("no score")


def micro_config(**grpo):
  c = default_config()
  for k, v in MICRO.items():
    c.model[k] = v
  c.model.vocab_size = 259
  c.sft.steps = 0
  c.grpo.update(dict(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=6, prompt_len=8, epochs=2,
                     minibatches=2, lr=3e-3, kl_coef=0.1), **grpo)
  c.rewards.names = "tests.posttrain.test_run:length_reward"
  c.rewards.weights = "1.0"
  c.update(eval_every=0, checkpoint_every=1, max_to_keep=5, progress=False, log_every=1)
  return c


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def params_at(workdir, step):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  restored = ckpt._manager.restore(step)      # pylint: disable=protected-access
  ckpt.close()
  return restored["state"]["policy"]["params"]


def test_resume_is_exact(tmp_path):
  workdir = str(tmp_path / "run")
  run_grpo(micro_config(), workdir)                  # checkpoints after steps 1, 2, 3
  first = rows(workdir)
  final = params_at(workdir, 3)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  summary = run_grpo(micro_config(), workdir)       # resumes after step 2, redoes step 3
  assert summary["step"] == 3 and summary["replay"]
  again = rows(workdir)
  assert [r["step"] for r in first] == [1, 2, 3] and [r["step"] for r in again] == [1, 2, 3, 3]
  for key in ("reward", "kl", "clip_fraction", "loss", "response_length"):
    assert first[2][key] == again[3][key], key
  assert first[2]["kl"] > 0 and first[2]["updates"] == 12      # 2 epochs x 2 minibatches per step
  jax.tree.map(np.testing.assert_array_equal, final, params_at(workdir, 3))


def test_bad_input(tmp_path):
  with pytest.raises(UserError, match="group_size=1"):
    run_grpo(micro_config(group_size=1), str(tmp_path / "g1"))
  with pytest.raises(UserError, match="exceeds model.max_position_embeddings"):
    run_grpo(micro_config(prompt_len=60), str(tmp_path / "ctx"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  c = micro_config()
  c.task.problems = str(empty)
  with pytest.raises(UserError, match="no problems"):
    run_grpo(c, str(tmp_path / "empty"))
  long = tmp_path / "long.jsonl"
  long.write_text("".join(json.dumps({"prompt": "9" * n, "answer": "1"}) + "\n" for n in (40, 2, 2, 2, 2)))
  c.task.problems = str(long)
  with pytest.raises(UserError, match="more than config.grpo.prompt_len=8"):
    run_grpo(c, str(tmp_path / "long"))
  c = micro_config()
  c.rewards.names = "tests.posttrain.test_run:broken_reward"
  with pytest.raises(UserError, match="raised KeyError"):
    run_grpo(c, str(tmp_path / "raises"))


def test_cli_exit_status(tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.grpo", "--config=experiments/configs/grpo_tiny.py",
                      f"--workdir={tmp_path}", "--config.grpo.group_size=1"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: config.grpo.group_size=1: group-normalized advantages need G >= 2"]


@pytest.mark.parametrize("name", ["sft_tiny", "grpo_tiny"])
def test_configs_build(name):
  import importlib
  from deepseek_jax.training import model_config
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  cfg = model_config(config)
  assert cfg.vocab_size == 259 and not cfg.scan_layers and cfg.num_nextn_predict_layers == 0
  assert config.grpo.prompt_len + config.grpo.max_new_tokens <= cfg.max_position_embeddings
