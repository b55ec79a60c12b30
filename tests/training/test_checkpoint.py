"""Checkpointer: exact round trip, and an unreadable newest checkpoint falls back to the previous one."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.training import Checkpointer
from deepseek_jax.training.checkpoint import abstract_like


def test_roundtrip_and_fallback(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  states = {s: {"w": jnp.arange(6.0).reshape(2, 3) * s, "step": jnp.int32(s)} for s in (1, 2, 3)}
  for s, st in states.items():
    ckpt.save(s, st, {"data": {"consumed": 8 * s}})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]  # max_to_keep
  abstract = abstract_like(states[3])
  step, state, meta = ckpt.restore_latest(abstract)
  assert step == 3 and meta == {"data": {"consumed": 24}}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[3]["w"]))
  shutil.rmtree(tmp_path / "ckpt" / "3" / "state")
  with pytest.warns(UserWarning, match=f"checkpoint {tmp_path / 'ckpt' / '3'} is unreadable.*falling back "
                                       "to step 2"):
    step, state, meta = ckpt.restore_latest(abstract)
  assert step == 2 and meta["data"]["consumed"] == 16 and int(state["step"]) == 2
  ckpt.close()
