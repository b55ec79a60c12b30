"""Checkpointer: exact round trip, checksums (a damaged newest checkpoint falls back to the previous one, none
readable refuses), and a failed write reported once with the previous checkpoint intact."""

import os
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.training import CheckpointError, Checkpointer
from deepseek_jax.training.checkpoint import CHECKSUMS_FILE, abstract_like
from deepseek_jax.training.trainer import _nonfinite_leaf


def _flip(path, n=64):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, min(len(data) // 2 + n, len(data))):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f != CHECKSUMS_FILE]
  return max(files, key=os.path.getsize)


def test_roundtrip_checksums_and_fallback(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  states = {s: {"w": jnp.arange(600.0).reshape(20, 30) * s, "step": jnp.int32(s)} for s in (1, 2, 3)}
  for s, st in states.items():
    ckpt.save(s, st, {"data": {"consumed": 8 * s}})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]  # max_to_keep
  assert all(ckpt.verify(s) for s in (2, 3))
  abstract = abstract_like(states[3])
  step, state, meta = ckpt.restore_latest(abstract)
  assert step == 3 and meta == {"data": {"consumed": 24}} and not ckpt.damaged
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[3]["w"]))
  _flip(_largest_file(tmp_path / "ckpt" / "3"))
  step, state, meta = ckpt.restore_latest(abstract)
  assert step == 2 and meta["data"]["consumed"] == 16 and int(state["step"]) == 2 and ckpt.damaged == [3]
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[2]["w"]))
  moved = ckpt.set_aside(3)
  assert moved.endswith("3.damaged") and ckpt.all_steps() == [2]
  _flip(_largest_file(tmp_path / "ckpt" / "2"))
  with pytest.raises(CheckpointError, match="no checkpoint in .* can be read"):
    ckpt.restore_latest(abstract)
  ckpt.close()


def test_failed_write_is_one_error_and_the_previous_checkpoint_stays_restorable(tmp_path, capfd):
  ckpt = Checkpointer(tmp_path / "ckpt")
  # Incompressible: the second checkpoint's files cannot fit under the file-size limit below.
  big = {f"a{i}": jax.random.normal(jax.random.PRNGKey(i), (8192,)) for i in range(8)}
  ckpt.save(1, big, {"step": 1})
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG in orbax's background threads.
  resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
  try:
    with pytest.raises(CheckpointError) as err:
      ckpt.save(2, jax.tree.map(lambda x: x + 1, big), {"step": 2})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  msg = str(err.value)
  assert "\n" not in msg and "File too large" in msg, msg
  assert f"checkpoint {tmp_path / 'ckpt' / '2'} failed" in msg and f"{tmp_path / 'ckpt' / '1'} is intact" in msg
  ckpt.close()
  printed = capfd.readouterr()
  assert "Traceback" not in printed.err and "Event loop is closed" not in printed.err, printed.err[-2000:]
  ckpt = Checkpointer(tmp_path / "ckpt")
  step, state, _ = ckpt.restore_latest(abstract_like(big))
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, state, big)
  ckpt.close()


def test_nonfinite_leaf_names_the_array():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf]), "d": jnp.int32(2)}}
  assert _nonfinite_leaf(tree) == "['b']['c']"
  assert _nonfinite_leaf({"a": jnp.ones(3)}) is None
