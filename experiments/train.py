r"""Trains a DeepSeek-V3-style model.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/run [--config.FIELD=VALUE]

Restarting with the same --workdir resumes from its newest checkpoint. The workdir holds the checkpoints,
metrics.jsonl, the tokenizer and the model's config.json; `python -m experiments.convert --to_hf
--workdir=DIR --out=HF` exports the newest checkpoint for transformers, `python -m experiments.generate
--workdir=DIR` samples from it.  Mistakes in the flags, the config, the data or the mesh end with one line
`error: ...` and exit status 2; a run stopped by max_bad_steps non-finite steps exits with status 1.

Sharded over a mesh (`--config.mesh.data/fsdp/expert/tensor`, -1 = the remaining devices) and over several
processes: start one per host (or per GPU) with the same flags plus
  --distributed                          (SLURM / Open MPI detected), or
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
and the same --workdir on a shared filesystem (checkpoints are written by all processes).
"""

import os
import sys

from absl import app
from absl import flags

from experiments import cli

_CONFIG = cli.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py"),
    "experiment config file (a get_config() module; experiments/configs/); --config.FIELD=VALUE overrides "
    "any field of deepseek_jax.training.default_config()")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (required): checkpoints/, metrics.jsonl, "
                                "tokenizer/, the model's config.json; an existing run resumes")
_INIT_FROM = flags.DEFINE_string("init_from", None, "start from the weights of this orbax model checkpoint "
                                 "(experiments.convert; ignored when the workdir has a checkpoint)")
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
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"--workdir={_WORKDIR.value} exists and is not a directory")
  from deepseek_jax import distributed, host_memory  # pylint: disable=g-import-not-at-top
  if _RETAIN.value:   # before JAX starts its backend and threads
    host_memory.retain_freed_memory()
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value is not None:
    # before anything touches a device
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from deepseek_jax.training import TrainingDiverged, train  # pylint: disable=g-import-not-at-top
  try:
    summary = train(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
  except TrainingDiverged as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(1)
  if distributed.is_main_process():
    parts = [f"step {summary['step']}"]
    if summary.get("last_ce") is not None:
      parts.append(f"train cross-entropy {summary['first_ce']:.4f} -> {summary['last_ce']:.4f}")
    for key, fmt in (("eval_loss", "held-out cross-entropy {:.4f}"), ("eval_bpb", "held-out bits/byte {:.4f}"),
                     ("tokens_per_sec", "{:.0f} tokens/s"), ("wall_s", "{:.1f} s")):
      if summary.get(key) is not None:
        parts.append(fmt.format(summary[key]))
    print(("stopped by signal: " if summary["stopped"] == "signal" else "done: ") + ", ".join(parts))
    for text in summary["samples"]:
      print("---- sample ----")
      print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  cli.run(main)
