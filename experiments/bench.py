"""Benchmark dispatcher: `python -m experiments.bench --suite=kernels [--json=PATH] [--small]`.

Each suite is a module `experiments.benchmarks.<name>` with `run(flags) -> dict`; it is imported only
when chosen. Adding a suite is one line in `SUITES`.
"""

import importlib
import json
import os

from absl import app, flags

SUITES = {
    "kernels": "experiments.benchmarks.kernels",
    "convert": "experiments.benchmarks.convert",
    "train": "experiments.benchmarks.train",
    "moe": "experiments.benchmarks.moe",
    "compile": "experiments.benchmarks.compile",
    "decode": "experiments.benchmarks.decode",
    "scale": "experiments.benchmarks.scale",
}

flags.DEFINE_enum("suite", "kernels", sorted(SUITES), "Benchmark suite to run.")
flags.DEFINE_string("json", "", "Also write the result JSON to this path.")
flags.DEFINE_bool("small", False, "Small shapes (the default on CPU).")
flags.DEFINE_integer("runs", 0, "Timed runs per case (0: the suite's default).")
flags.DEFINE_string("preset", "", "Model for the train and decode suites: a preset name or "
                    "'bench-6.5m' (default).")
flags.DEFINE_string("dtype", "", "Train suite: compute dtype of our model (default: the preset's); scale suite: "
                    "the precision recipes compiled (default 'bf16,fp8').")
flags.DEFINE_integer("batch", 0, "Global batch in sequences (0: the suite's default; train 8, decode 4).")
flags.DEFINE_integer("seq_len", 0, "Train suite: sequence length (0: 256); decode suite: cache length "
                     "(0: 4096).")
flags.DEFINE_string("remat", "", "Train suite: also time our step under these remat policies, e.g. "
                    "'full,dots'.")
flags.DEFINE_string("maxtext", "dense", "Train suite: MaxText's own train step on the same config, in these "
                    "modes of its expert layer (experiments/benchmarks/maxtext_step.py: dense, sparse, "
                    "capacity), where maxtext is importable; 'none' skips it.")
flags.DEFINE_string("ablate", "", "Train suite: also time our step with these parts swapped for stand-ins of "
                    "negligible work, e.g. 'routed_experts,attention' or 'all' "
                    "(experiments/benchmarks/ablation.py), for each part's wall-clock cost.")
flags.DEFINE_string("impls", "", "Train suite: also time our step with each of these implementation choices "
                    "(ModelConfig.attention_impl / moe_impl / matmul_impl), e.g. 'matmul_impl=xla,moe_impl=blocked'.")
flags.DEFINE_bool("scan_layers", False, "Train suite: also time our step with ModelConfig.scan_layers=True.")
flags.DEFINE_string("mesh", "", "Scale suite: mesh of the compiled step, e.g. 'fsdp:16,expert:64,tensor:2' "
                    "(default: experiments/configs/v3.py's).")
flags.DEFINE_string("compile_layers", "", "Depths the compile suite compiles at, e.g. '4,8' "
                    "(default: first_k_dense + 1 and twice that).")
flags.DEFINE_string("profile", "", "Train suite: also profile our step into this directory (the jax profiler "
                    "trace, the optimized HLO, ops.json) and print where its time goes.")
flags.DEFINE_float("moe_imbalance", 0.0, "MoE suite: also time every case with the routing skewed to this "
                   "max / mean expert load, e.g. 1.6 (0: only the balanced random routing).")
flags.DEFINE_bool("retain_freed_memory", True, "Keep freed host memory for reuse (glibc; "
                  "deepseek_jax.host_memory), set before JAX starts: every contender in the run gains alike.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.retain_freed_memory:
    from deepseek_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.retain_freed_memory()
  result = importlib.import_module(SUITES[FLAGS.suite]).run(FLAGS)
  text = json.dumps(result, indent=2, sort_keys=False)
  print(text)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
