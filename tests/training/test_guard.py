"""The divergence guard: max_bad_steps consecutive non-finite steps stop the run with a checkpoint."""

import os

import pytest

from deepseek_jax.training.trainer import TrainingDiverged, train
from training_utils import micro_config


def test_non_finite_steps_stop_the_run_after_max_bad_steps(tmp_path):
  # A huge learning rate makes the parameters overflow after the first update: every later step is
  # non-finite, skipped (the state is kept) and counted.
  config = micro_config(steps=20, max_bad_steps=3, checkpoint_every=0, log_every=0, optimizer__lr=1e30)
  with pytest.raises(TrainingDiverged, match="3 consecutive steps") as err:
    train(config, str(tmp_path))
  # Step 1 is finite, steps 2-4 are not.  The guard reads each step's streak one step late (no host
  # sync on the step just dispatched), so it stops after step 5 was queued and saves that state.
  assert "(step 4)" in str(err.value)
  saved = int(str(err.value).rsplit("/", 1)[1])
  assert saved == 5
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", str(saved)))
