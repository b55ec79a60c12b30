"""Benchmarks: `python -m experiments.bench --suite=kernels [--json=PATH] [--small]`.

Runs one suite (`--suite`; its help lists them), prints progress lines as it goes and the result as JSON
on stdout (and into --json).  Each suite is a module `experiments.benchmarks.<name>` with `run(flags) ->
dict`; it is imported only when chosen. Adding a suite is one line in `SUITES`.  Mistakes in the flags end
with one line `error: ...` and exit status 2.
"""

import ast
import importlib
import json
import os

from absl import app, flags

from experiments import cli

SUITES = {
    "kernels": "experiments.benchmarks.kernels",
    "convert": "experiments.benchmarks.convert",
    "train": "experiments.benchmarks.train",
    "moe": "experiments.benchmarks.moe",
    "compile": "experiments.benchmarks.compile",
    "decode": "experiments.benchmarks.decode",
    "cuda_compile": "experiments.benchmarks.cuda_compile",
    "scale": "experiments.benchmarks.scale",
}


def _suite_help() -> str:
  """One line per suite: the first line of its module's docstring (read without importing it)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = []
  for name, module in sorted(SUITES.items()):
    path = os.path.join(root, *module.split(".")) + ".py"
    try:
      with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
      doc = ""
    first = doc.strip().splitlines()[0].rstrip(".") if doc.strip() else module
    lines.append(f"{name}: {first.split(': ', 1)[1] if first.startswith('`--suite') else first}")
  return "Benchmark suite to run. " + "; ".join(lines)


flags.DEFINE_enum("suite", "kernels", sorted(SUITES), _suite_help())
flags.DEFINE_string("json", "", "Also write the result JSON to this path.")
flags.DEFINE_bool("small", False, "Small shapes: kernels and moe suites (their default off GPU); convert suite: "
                  "a ~0.25 GB checkpoint instead of ~2 GB.")
flags.DEFINE_integer("runs", 0, "Timed runs per case (0: the suite's default).")
flags.DEFINE_string("preset", "", "Model of the train, decode and compile suites: a preset name or "
                    "'bench-6.5m' (default: train and decode 'bench-6.5m', compile 'deepseek-v3').")
flags.DEFINE_string("dtype", "", "Train suite: compute dtype of our model (default: the preset's); scale suite: "
                    "the precision recipes compiled (default 'bf16,fp8').")
flags.DEFINE_integer("batch", 0, "Global batch in sequences (0: the suite's default; train 8, decode 4, "
                     "compile 1).")
flags.DEFINE_integer("seq_len", 0, "Train and compile suites: sequence length (0: 256, compile 512); decode "
                     "suite: cache length (0: 4096).")
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
flags.DEFINE_enum("target", "cpu", ["cpu", "h100"], "Scale suite: compile for XLA's host devices (cpu) or "
                  "for H100s with the CUDA plugin's compile-only devices (h100; no GPU needed, .ci/cuda_env.sh).")
flags.DEFINE_string("compile_layers", "", "Depths the compile suite compiles at, e.g. '4,8' "
                    "(default: first_k_dense + 1 and twice that).")
flags.DEFINE_string("profile", "", "Train suite: also profile our step into this directory (the jax profiler "
                    "trace, the optimized HLO, ops.json) and print where its time goes.")
flags.DEFINE_float("moe_imbalance", 0.0, "MoE suite: also time every case with the routing skewed to this "
                   "max / mean expert load, e.g. 1.6 (0: only the balanced random routing).")
flags.DEFINE_bool("retain_freed_memory", False, "CPU only: keep freed host memory for reuse (glibc; "
                  "deepseek_jax.host_memory), set before JAX starts: every contender in the run gains alike.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.json and os.path.isdir(FLAGS.json):
    raise app.UsageError(f"--json={FLAGS.json} is a directory; give a file path")
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
  cli.run(main)
