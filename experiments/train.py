r"""Trains a DeepSeek-V3-style model.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/run [--config.FIELD=VALUE]

Restarting with the same --workdir resumes from its newest checkpoint. Mistakes in the config, the data or the
mesh end with a one-line message and exit status 2.

Sharded over a mesh (`--config.mesh.data/fsdp/expert/tensor`, -1 = the remaining devices) and over several
processes: start one per host (or per GPU) with the same flags plus
  --distributed                          (SLURM / Open MPI detected), or
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
and the same --workdir on a shared filesystem (checkpoints are written by all processes).
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
                                 "multi-host run: start jax.distributed, detecting the cluster (SLURM, Open MPI, "
                                 "env COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (multi-host runs; default: detected "
    "from SLURM / Open MPI / env COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (default: detected)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "rank of this process (default: detected)")
_RETAIN = flags.DEFINE_bool("retain_freed_memory", False,
                            "CPU runs: keep freed host memory for reuse (glibc; deepseek_jax.host_memory), so "
                            "that XLA:CPU's per-step buffers are not page-faulted in anew every step; does "
                            "nothing where a GPU backend is present")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from deepseek_jax import distributed, host_memory  # pylint: disable=g-import-not-at-top
  if _RETAIN.value:   # before JAX starts its backend and threads
    host_memory.retain_freed_memory()
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value is not None:
    try:  # before anything touches a device
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  from deepseek_jax.training import TrainingDiverged, UserError, train  # pylint: disable=g-import-not-at-top
  try:
    summary = train(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingDiverged as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(1)
  if distributed.is_main_process():
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
