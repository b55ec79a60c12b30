r"""GRPO with rule-based rewards (R1's recipe) on a verifiable task, with routing replay for MoE policies.

  python -m experiments.grpo --config=experiments/configs/grpo_tiny.py --workdir=/tmp/grpo [--config.X=V]

Without --config.init_from the policy is first SFT'd on the task's worked solutions (in WORKDIR/sft).
Writes WORKDIR/metrics.jsonl (step, reward, kl, clip_fraction, response_length, eval_accuracy, ...),
tensorboard/ and checkpoints/; the same --workdir resumes exactly.  Mistakes in the config, the data or a
reward function end with a one-line message and exit status 2.
"""

import os

from absl import app
from absl import flags
from absl import logging

from experiments import cli

_CONFIG = cli.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "grpo_tiny.py"),
    "experiment config file (a get_config() module)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, sft/)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from deepseek_jax.posttrain import run_grpo  # pylint: disable=g-import-not-at-top
  s = run_grpo(_CONFIG.value, _WORKDIR.value)
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  if s["sft"] is not None:
    print(f"sft: step {s['sft']['step']}, loss {fmt(s['sft']['first_loss'])} -> {fmt(s['sft']['last_loss'])}, "
          f"held-out accuracy {fmt(s['sft']['eval_accuracy'])}")
  print(f"done: step {s['step']}, replay {'on' if s['replay'] else 'off'}, held-out accuracy "
        f"{fmt(s['eval_accuracy_before'])} -> {fmt(s['eval_accuracy'])}, reward {fmt(s['reward_first'])} -> "
        f"{fmt(s['reward_last'])}, {fmt(s['step_s'])} s/step, {s['wall_s']:.1f} s")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  cli.run(main)
