"""The divergence guard: max_bad_steps consecutive non-finite steps stop the run with a checkpoint, and a run
whose every step since its (re)start was non-finite never ends as a success."""

import os

from training_utils import micro_flags, run_train


def test_non_finite_steps_stop_the_run_and_an_all_non_finite_run_fails(tmp_path):
  # A huge learning rate makes the parameters overflow after the first update: every later step is
  # non-finite, skipped (the state is kept) and counted.
  flags = micro_flags(steps=20, checkpoint_every=0, log_every=0, optimizer__lr=1e30)
  r = run_train(tmp_path, *flags, "--config.max_bad_steps=3")
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  # Step 1 is finite, steps 2-4 are not.  The guard reads each step's streak one step late (no host
  # sync on the step just dispatched), so it stops after step 5 was queued and saves that state.
  assert len(lines) == 1 and "stopped: 3 consecutive steps" in lines[0] and "(step 4)" in lines[0], r.stderr
  assert lines[0].endswith(os.path.join(str(tmp_path), "checkpoints", "5"))
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "5"))
  # Resumed with the guard off (the same compiled step): steps 6-20 are all non-finite, which is no success
  # and saves nothing.
  r = run_train(tmp_path, *flags, "--config.max_bad_steps=0")
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "stopped: all 15 steps since step 5 had a non-finite loss" in lines[0], r.stderr
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["5"]
