"""Two processes on localhost (4 CPU devices each, jax.distributed with gloo collectives) reproduce the
single-process 8-device run of the same layout: forward, gradients and training losses."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.parallel.conftest import ROOT, worker_env


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
