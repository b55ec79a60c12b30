r"""Trains a DeepSeek-V3-style model.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/run [--config.FIELD=VALUE]

Restarting with the same --workdir resumes from its newest checkpoint. Mistakes in the config, the data or the
mesh end with a one-line message and exit status 2.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py",
                                          "experiment config file (a get_config() module)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, tokenizer)")
_INIT_FROM = flags.DEFINE_string("init_from", None, "start from this converted checkpoint directory")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() first (multi-host runs)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  import jax  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training import TrainingDiverged, UserError, train  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    summary = train(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingDiverged as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    parts = [f"step {summary['step']}"]
    for key, fmt in (("first_loss", "first loss {:.4f}"), ("last_loss", "last loss {:.4f}"),
                     ("eval_loss", "held-out loss {:.4f}"), ("eval_bpb", "held-out bits/byte {:.4f}"),
                     ("tokens_per_sec", "{:.0f} tokens/s"), ("wall_s", "{:.1f} s")):
      if summary.get(key) is not None:
        parts.append(fmt.format(summary[key]))
    print(("stopped by signal: " if summary["stopped"] == "signal" else "done: ") + ", ".join(parts))
    for text in summary["samples"]:
      print("---- sample ----")
      print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
