"""A run directory under faults: a restart with another model or with only unreadable checkpoints refuses
and changes nothing, a damaged newest checkpoint falls back to the previous one (and resumes exactly), a
second trainer refuses while the first holds the lock (a killed holder does not), and optimizer values are
checked before anything runs."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

from deepseek_jax.training import CheckpointError, UserError, read_metrics, train
from deepseek_jax.training.checkpoint import CHECKSUMS_FILE
from training_utils import ROOT, micro_config, micro_flags, run_train

N = 8  # checkpoints at 4 and 8


def _tree_hash(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _flip(step_dir, n=64):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f != CHECKSUMS_FILE]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + n):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  r = run_train(wd, *micro_flags(steps=N))
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "experiment_config.json").is_file()
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "8"]
  return wd, {m["step"]: m["loss"] for m in read_metrics(wd) if "loss" in m}


def _copy(finished_run, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(finished_run[0], wd)
  return wd


def test_restart_with_another_model_refuses_and_changes_nothing(finished_run, tmp_path):
  wd = _copy(finished_run, tmp_path)
  before = _tree_hash(wd)
  with pytest.raises(UserError) as err:  # steps may change on resume, the model may not
    train(micro_config(steps=2 * N, model__num_hidden_layers=3), str(wd))
  assert "holds a different run (model.num_hidden_layers: 2 -> 3)" in str(err.value)
  assert "\n" not in str(err.value) and not isinstance(err.value, CheckpointError)
  assert _tree_hash(wd) == before


def test_restart_over_unreadable_checkpoints_refuses_and_changes_nothing(finished_run, tmp_path):
  wd = _copy(finished_run, tmp_path)
  for step in (4, 8):
    _flip(wd / "checkpoints" / str(step))
  before = _tree_hash(wd)
  with pytest.raises(CheckpointError, match="no checkpoint in .* can be read .*nothing was changed"):
    train(micro_config(steps=N), str(wd))
  assert _tree_hash(wd) == before


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(finished_run, tmp_path):
  wd = _copy(finished_run, tmp_path)
  _flip(wd / "checkpoints" / "8")
  # log_every and checkpoint_every may change on resume.
  r = run_train(wd, *micro_flags(steps=N, log_every=2, checkpoint_every=8))
  assert r.returncode == 0, r.stderr[-3000:]
  named = [l for l in r.stderr.splitlines() if "checkpoints/8 is damaged" in l]
  assert len(named) == 1 and "does not match its checksum" in named[0] and "falling back to step 4" in named[0]
  assert f"resumed from {wd}/checkpoints/4" in r.stdout
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "8", "8.damaged"]
  resumed = {m["step"]: m["loss"] for m in read_metrics(wd) if "loss" in m}
  for step in (6, 8):  # the uninterrupted run's losses
    assert abs(resumed[step] - finished_run[1][step]) <= 1e-6, (step, resumed[step], finished_run[1][step])


def test_second_trainer_refuses_and_a_killed_holder_does_not_block(tmp_path):
  wd = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from deepseek_jax.training.rundir import RunLock; "
       "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", wd],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="is in use by another trainer"):
      train(micro_config(steps=N), wd)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  from deepseek_jax.training.rundir import RunLock  # pylint: disable=g-import-not-at-top
  RunLock(wd).release()


@pytest.mark.parametrize("field,value,message", [
    ("optimizer__lr", float("inf"), "config.optimizer.lr=inf must be a finite number"),
    ("optimizer__lr", float("nan"), "config.optimizer.lr=nan must be a finite number"),
    ("optimizer__b2", 1.0, "config.optimizer.b2=1.0 must be in [0, 1)"),
    ("optimizer__eps", 0.0, "config.optimizer.eps=0.0 must be > 0"),
])
def test_optimizer_values_are_refused_before_anything_runs(tmp_path, field, value, message):
  with pytest.raises(UserError) as err:
    train(micro_config(steps=N, **{field: value}), str(tmp_path / "run"))
  assert str(err.value) == message
  assert not (tmp_path / "run").exists()
