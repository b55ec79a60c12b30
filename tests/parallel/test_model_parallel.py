"""The whole model sharded over data + fsdp + expert (+ tensor) equals one device: forward, gradients,
router statistics, training steps; parameters and optimizer state sit where the rules say; and two processes on
localhost (4 CPU devices each, jax.distributed with gloo collectives) reproduce the single-process 8-device run
of the same layout. One file, so that the single-process run (the `layouts` fixture) is computed once."""

import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.parallel.conftest import ROOT, worker_env

LAYOUTS = ("data2_fsdp2_expert2", "fsdp2_expert2_tensor2")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_device(layouts, layout):
  r = layouts[layout]
  assert r["logits"] < 1e-5 and r["grad_max"] < 1e-5, r
  # Router statistics are global sums under jit: exact, and so is the bias update they drive.
  assert r["tpe"] == 0.0 and r["balance"] < 1e-6 and r["bias"] == 0.0, r
  # Three AdamW steps: losses equal step for step.
  assert r["losses"] < 1e-5, (r["losses"], layouts["ref_losses"])
  assert len(layouts["ref_losses"]) == 3


@pytest.mark.slow
def test_parameter_shardings_follow_rules(layouts):
  # (path, expected spec) on data2_fsdp2_expert2 and on fsdp2_expert2_tensor2.
  expected = {
      "data2_fsdp2_expert2": {
          ".params['layers_1']['mlp']['experts']['gate_proj']": ["expert", "fsdp", None],
          ".params['layers_1']['mlp']['experts']['down_proj']": ["expert", None, "fsdp"],
          ".params['layers_1']['self_attn']['q_b_proj']['kernel']": [None, None, None],
          ".params['embed_tokens']['embedding']": [None, "fsdp"],
          ".params['layers_1']['mlp']['gate']['kernel']": ["fsdp", None],
          ".params['layers_1']['input_layernorm']['weight']": [None],
          ".opt_state[1].mu['layers_1']['mlp']['experts']['up_proj']": ["expert", "fsdp", None],
          ".opt_state[1].nu['embed_tokens']['embedding']": [None, "fsdp"],
          ".step": [],
      },
      "fsdp2_expert2_tensor2": {
          ".params['layers_1']['mlp']['experts']['gate_proj']": ["expert", "fsdp", "tensor"],
          ".params['layers_1']['mlp']['experts']['down_proj']": ["expert", "tensor", "fsdp"],
          ".params['layers_1']['self_attn']['q_b_proj']['kernel']": [None, "tensor", None],
          ".params['layers_1']['self_attn']['o_proj']['kernel']": ["tensor", None, "fsdp"],
          ".params['layers_1']['mlp']['shared_experts']['down_proj']['kernel']": ["tensor", "fsdp"],
          ".params['lm_head']['kernel']": ["fsdp", "tensor"],
          ".params['embed_tokens']['embedding']": ["tensor", "fsdp"],
          ".opt_state[1].mu['layers_1']['self_attn']['kv_b_proj']['kernel']": [None, "tensor", None],
      },
  }
  for layout, want in expected.items():
    specs = layouts[layout]["specs"]
    for path, spec in want.items():
      got = list(specs[path]) + [None] * (len(spec) - len(specs[path]))
      assert got == spec, (layout, path, specs[path])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(layouts, tmp_path):
  out = str(tmp_path / "mp.npz")
  coord = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.model_worker", "run", out,
                             "data2_fsdp2_expert2", coord, "2", str(i)], cwd=ROOT, env=worker_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append((p.returncode, stdout, stderr[-4000:]))
  assert all(rc == 0 for rc, _, _ in logs), logs
  assert '"processes": 2, "devices": 8, "local_devices": 4' in logs[0][1]
  multi, single = np.load(out), np.load(layouts["npz"])
  assert set(multi.files) == set(single.files)
  for k in single.files:
    scale = max(float(np.max(np.abs(single[k]))), 1e-30)
    np.testing.assert_array_less(np.max(np.abs(multi[k] - single[k])) / scale, 1e-5, err_msg=k)
  assert multi["losses"].shape == (3,)
