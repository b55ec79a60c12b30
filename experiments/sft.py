r"""Supervised fine-tuning on prompt/response pairs or chat turns (loss on the responses only).

  python -m experiments.sft --config=experiments/configs/sft_tiny.py --workdir=/tmp/sft \
      [--config.sft.data=FILE.jsonl] [--config.init_from=RUN_WORKDIR_OR_CONVERTED_CHECKPOINT]

FILE.jsonl holds {'prompt', 'response'} or {'messages': [{'role', 'content'}, ...]} per line; without it the
task's worked solutions are the data.  The same --workdir resumes; mistakes end with one line and exit 2.
"""

import os

from absl import app
from absl import flags
from absl import logging

from experiments import cli

_CONFIG = cli.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sft_tiny.py"),
    "experiment config file (a get_config() module)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, tokenizer)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from deepseek_jax.posttrain import run_sft  # pylint: disable=g-import-not-at-top
  s = run_sft(_CONFIG.value, _WORKDIR.value)
  acc = "" if s["eval_accuracy"] is None else f", held-out accuracy {s['eval_accuracy']:.3f}"
  loss = "" if s["first_loss"] is None else f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
  print(f"done: step {s['step']}{loss}{acc}, {s['wall_s']:.1f} s")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  cli.run(main)
