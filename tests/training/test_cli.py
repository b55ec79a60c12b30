"""The train command end to end (subprocesses): exact resume, SIGTERM, an unreadable checkpoint, user errors,
export of the run to HF (transformers computes its logits) and generation from the export; loading a run whose
newest checkpoint is damaged (the previous one, nothing changed on disk; a damaged --step exits 2)."""

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepseek_jax.training import read_metrics
from training_utils import ROOT, micro_flags, run_train

N = 8


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  wd = tmp_path_factory.mktemp("baseline")
  # Steps 3 and 4 under the profiler: it must leave the losses alone (the resumed runs compared with
  # these are not profiled).
  r = run_train(wd, *micro_flags(steps=2 * N), "--config.profile.start_step=2", "--config.profile.steps=2")
  assert r.returncode == 0, r.stderr[-3000:]
  losses = _losses(wd)
  assert sorted(losses) == list(range(1, 2 * N + 1))
  assert (wd / "tokenizer" / "tokenizer_config.json").is_file()
  return losses, wd


def test_profiled_steps_are_folded_onto_the_model(baseline):
  _, wd = baseline
  with open(wd / "profile" / "ops.json") as f:
    prof = json.load(f)
  assert prof["runs"] == 2 and prof["module_name"].startswith("jit_") and prof["wall_ms"] > 0
  modules = {(o["phase"], o["module"]) for o in prof["ops"]}
  for phase in ("forward", "backward"):
    assert any(p == phase and "/self_attn" in m for p, m in modules)
    assert any(p == phase and "/mlp" in m for p, m in modules)
  assert "utilization" in (wd / "profile" / "summary.txt").read_text()
  assert glob.glob(str(wd / "profile" / "trace" / "**" / "*.xplane.pb"), recursive=True)


def _assert_same(losses, baseline):
  assert sorted(losses) == sorted(baseline)
  diff = max(abs(losses[s] - baseline[s]) for s in baseline)
  assert diff <= 1e-6, diff


@pytest.mark.slow
def test_stop_and_resume_reproduces_losses(baseline, tmp_path):
  r = run_train(tmp_path, *micro_flags(steps=N))
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_train(tmp_path, *micro_flags(steps=2 * N))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  _assert_same(_losses(tmp_path), baseline[0])



@pytest.mark.slow
def test_sigterm_saves_and_restart_reproduces_losses(baseline, tmp_path):
  proc = run_train(tmp_path, *micro_flags(steps=2 * N, checkpoint_every=0), wait=False)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  # Polled often: once compiled, a micro step takes milliseconds, and the signal must land before the
  # 2N steps are done.
  while time.time() < deadline:
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
      break
    if proc.poll() is not None:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by signal" in out
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and 3 <= saved[-1] < 2 * N, saved  # checkpoint_every=0: only the signal saved one
  r = run_train(tmp_path, *micro_flags(steps=2 * N, checkpoint_every=0))
  assert r.returncode == 0, r.stderr[-3000:]
  _assert_same(_losses(tmp_path), baseline[0])


@pytest.mark.parametrize("flags,message", [
    (["--config.data.path=/nonexistent/corpus"], "corpus path /nonexistent/corpus does not exist"),
    (["--config.mesh.data=3"], "mesh {'data': 3, 'fsdp': 1, 'expert': 1, 'tensor': 1} needs 3 devices"),
    (["--config.batch_size=5", "--config.mesh.data=2"], "does not split over the data axes"),
    (["--config.model.vocab_size=200"], "tokenizer vocab_size=259 exceeds the model's vocab_size=200"),
    (["--config.model.hidden_size=-4"], "hidden_size=-4 must be a positive integer"),
    (["--config.profile.steps=-1"], "config.profile.steps=-1 must be a non-negative integer"),
])
def test_user_errors_exit_2(tmp_path, flags, message):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  r = run_train(tmp_path, "--config.steps=2", "--config.sample.num=0", *flags, env=env, timeout=120)
  assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def _cli(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_run_exports_to_hf_and_generates_from_text(baseline, tmp_path):
  """convert --to_hf --workdir: transformers loads the run's checkpoint with its logits; the tokenizer goes along,
  so generation from the export reads a text prompt without --tokenizer."""
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from deepseek_jax import DeepSeekV3  # pylint: disable=g-import-not-at-top
  from deepseek_jax.data import ByteTokenizer, find_tokenizer  # pylint: disable=g-import-not-at-top
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  _, wd = baseline
  out = tmp_path / "hf"
  r = _cli("experiments.convert", "--to_hf", f"--workdir={wd}", "--step=12", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["step"] == 12 and summary["mtp_layers"] == 1
  assert isinstance(find_tokenizer(out), ByteTokenizer)

  cfg, variables, step = loading.load_workdir(str(wd), step=12)   # what the run's model computes at step 12
  assert step == 12
  theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype="float32")
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
  ours = np.asarray(DeepSeekV3(cfg).apply(variables, jnp.asarray(tokens)).logits, np.float64)
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    ref = theirs(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
  assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-5

  r = _cli("experiments.generate", f"--hf_dir={out}", "--prompt=def ", "--max_new_tokens=4", "--chunk_steps=4",
           "--nostop_at_eos")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("def ") and "4 tokens" in r.stderr, (r.stdout, r.stderr[-2000:])


def _snapshot(directory):
  """Every directory and file under `directory` with the SHA-256 of its bytes."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), directory)] = "dir"
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture
def damaged_run(baseline, tmp_path):
  """A copy of the baseline run with bytes flipped in its newest checkpoint (16) and a set-aside '20.damaged'
  (an intact copy of step 16): (workdir, the damaged file)."""
  from deepseek_jax.training.checkpoint import CHECKSUMS_FILE  # pylint: disable=g-import-not-at-top
  _, wd = baseline
  run = tmp_path / "run"
  shutil.copytree(wd, run, ignore=shutil.ignore_patterns("profile"))
  ckpts = run / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [8, 12, 16]
  shutil.copytree(ckpts / "16", ckpts / "20.damaged")
  files = [os.path.join(r, f) for r, _, fs in os.walk(ckpts / "16") for f in fs if f != CHECKSUMS_FILE]
  damaged = max(files, key=os.path.getsize)
  data = bytearray(open(damaged, "rb").read())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
  open(damaged, "wb").write(bytes(data))
  return run, damaged


def test_load_workdir_skips_a_damaged_checkpoint_and_changes_nothing(damaged_run, caplog):
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training import CheckpointError  # pylint: disable=g-import-not-at-top
  run, damaged = damaged_run
  before = _snapshot(run)
  with caplog.at_level(logging.WARNING):
    _, variables, step = loading.load_workdir(str(run))
  assert step == 12
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and damaged in warned[0] and "using step 12" in warned[0], warned
  _, expected, _ = loading.load_workdir(str(run), step=12)
  for (path, a), (_, b) in zip(_leaves(expected), _leaves(variables)):
    np.testing.assert_array_equal(a, b, err_msg=path)
  with pytest.raises(CheckpointError) as err:
    loading.load_workdir(str(run), step=16)
  assert str(err.value) == f"{damaged} does not match its checksum"
  assert _snapshot(run) == before


def test_convert_of_a_damaged_step_exits_2_naming_the_file(damaged_run, tmp_path):
  run, damaged = damaged_run
  before = _snapshot(run)
  r = _cli("experiments.convert", "--to_hf", f"--workdir={run}", "--step=16", f"--out={tmp_path / 'hf'}")
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert lines == [f"error: {damaged} does not match its checksum"], r.stderr[-2000:]
  assert "Traceback" not in r.stderr and not (tmp_path / "hf").exists()
  assert _snapshot(run) == before
