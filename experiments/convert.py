"""Converts checkpoints: HF safetensors <-> the project's orbax model checkpoint; a training run -> HF.

    python -m experiments.convert --hf_dir=DeepSeek-V3 --out=ckpt/v3 [--dtype=bfloat16] [--mesh_expert=8]
    python -m experiments.convert --to_hf --orbax_dir=ckpt/v3 --out=hf/v3 [--fp8] [--max_shard_size=5GB]
    python -m experiments.convert --to_hf --workdir=/tmp/run [--step=N] --out=hf/run

HF -> orbax reads (dequantizing FP8 blocks) with `deepseek_jax.interop.hf.load` and writes with
`deepseek_jax.interop.orbax_io.save_variables`.  --to_hf writes with `hf.save` a checkpoint that transformers'
DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for a V2 model) loads, from an orbax checkpoint or from a
training run's newest checkpoint (or --step; `deepseek_jax.inference.loading.load_workdir`).  The tokenizer
saved with the source (an HF directory's, an orbax checkpoint's, a training run's tokenizer/) is saved beside
the output, so `experiments.generate` reads text without --tokenizer.  Prints a JSON summary; mistakes end
with one line `error: ...` and exit status 2.
"""

import json
import os

from absl import app, flags

from experiments import cli

flags.DEFINE_string("hf_dir", None, "HF -> orbax: the HF checkpoint directory to read (config.json + "
                    "*.safetensors).")
flags.DEFINE_bool("to_hf", False, "Write an HF checkpoint from --orbax_dir or --workdir (default: HF -> orbax).")
flags.DEFINE_string("orbax_dir", None, "--to_hf: the orbax model checkpoint to read.")
flags.DEFINE_string("workdir", None, "--to_hf: the training run directory (experiments.train --workdir) to "
                    "read: its newest checkpoint, its config.json and its tokenizer.")
flags.DEFINE_integer("step", None, "--to_hf --workdir: the saved step to convert (default: the newest that "
                     "verifies).", lower_bound=0)
flags.DEFINE_string("out", None, "Output directory (must not exist, or be empty).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype: HF -> orbax, of the loaded "
                  "parameters (default float32); --to_hf, of the tensors not written as FP8 (default: the "
                  "checkpoint's own).")
flags.DEFINE_bool("fp8", False, "--to_hf: write the released FP8 layout (blockwise E4M3).")
flags.DEFINE_string("max_shard_size", "5GB", "--to_hf: bytes per safetensors file (e.g. 5GB, 500MB, 1000000).")
flags.DEFINE_bool("strict", True, "HF -> orbax: fail on checkpoint tensors the model has no place for.")
flags.DEFINE_integer("mesh_fsdp", 1, "HF -> orbax: load onto a mesh with this many fsdp shards (1 with the "
                     "others: no mesh, the default device).", lower_bound=1)
flags.DEFINE_integer("mesh_expert", 1, "HF -> orbax: expert-parallel shards of the load mesh.", lower_bound=1)
flags.DEFINE_integer("mesh_tensor", 1, "HF -> orbax: tensor-parallel shards of the load mesh.", lower_bound=1)
FLAGS = flags.FLAGS


def _mesh():
  import jax  # pylint: disable=g-import-not-at-top
  shape = (FLAGS.mesh_fsdp, FLAGS.mesh_expert, FLAGS.mesh_tensor)
  if shape == (1, 1, 1):
    return None
  if jax.device_count() % (shape[0] * shape[1] * shape[2]):
    raise app.UsageError(f"--mesh_fsdp x --mesh_expert x --mesh_tensor = {shape[0] * shape[1] * shape[2]} "
                         f"does not divide the {jax.device_count()} devices")
  return jax.make_mesh(shape, ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _check_flags():
  """The flags of one direction only, and an output directory that can take a checkpoint."""
  def given(*names):
    return [f"--{n}" for n in names if FLAGS[n].present]

  if FLAGS.to_hf:
    sources = [f"--{n}" for n in ("orbax_dir", "workdir") if FLAGS[n].value]
    if len(sources) != 1:
      raise app.UsageError(f"--to_hf reads one of --orbax_dir or --workdir; got {sources or 'neither'}")
    wrong = given("hf_dir", "strict", "mesh_fsdp", "mesh_expert", "mesh_tensor")
    if FLAGS.step is not None and not FLAGS.workdir:
      wrong.append("--step")
    if wrong:
      raise app.UsageError(f"{', '.join(wrong)}: not used with --to_hf")
  else:
    if not FLAGS.hf_dir:
      raise app.UsageError("give --hf_dir (HF -> orbax), or --to_hf with --orbax_dir or --workdir")
    wrong = given("orbax_dir", "workdir", "step", "fp8", "max_shard_size")
    if wrong:
      raise app.UsageError(f"{', '.join(wrong)}: only used with --to_hf")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if os.path.exists(FLAGS.out) and (not os.path.isdir(FLAGS.out) or os.listdir(FLAGS.out)):
    raise app.UsageError(f"--out={FLAGS.out} exists and is not an empty directory")


def to_hf():
  """--to_hf: (summary) after writing the HF checkpoint and the source's tokenizer."""
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop import hf, orbax_io, safetensors_io  # pylint: disable=g-import-not-at-top
  try:   # a bad size fails before the load
    ok = safetensors_io.parse_size(FLAGS.max_shard_size) > 0
  except ValueError:
    ok = False
  if not ok:
    raise app.UsageError(f"--max_shard_size={FLAGS.max_shard_size}: expected a positive size like 5GB, "
                         "500MB or 1000000 (bytes)")
  summary = dict(direction="orbax->hf")
  if FLAGS.workdir:
    cfg, variables, step = loading.load_workdir(FLAGS.workdir, step=FLAGS.step)
    tokenizer = loading.saved_tokenizer(os.path.join(FLAGS.workdir, "tokenizer"))
    summary.update(direction="run->hf", step=step)
  else:
    tokenizer = loading.saved_tokenizer(FLAGS.orbax_dir)
    cfg, variables = orbax_io.load_variables(FLAGS.orbax_dir)
  files = hf.save(FLAGS.out, cfg, variables, fp8=FLAGS.fp8, dtype=FLAGS.dtype,
                  max_shard_size=FLAGS.max_shard_size, progress=True)
  if tokenizer is not None:
    tokenizer.save(FLAGS.out)
  summary.update(out=FLAGS.out, files=len(files), fp8=FLAGS.fp8, mtp_layers=cfg.num_nextn_predict_layers,
                 tokenizer=repr(tokenizer) if tokenizer is not None else None)
  return summary


def from_hf():
  """HF -> orbax: (summary) after writing the orbax checkpoint and the HF directory's tokenizer."""
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop import hf, orbax_io  # pylint: disable=g-import-not-at-top
  tokenizer = loading.saved_tokenizer(FLAGS.hf_dir) if os.path.isdir(FLAGS.hf_dir) else None
  cfg, variables, report = hf.load_with_report(FLAGS.hf_dir, dtype=FLAGS.dtype or "float32", mesh=_mesh(),
                                               strict=FLAGS.strict, progress=True)
  orbax_io.save_variables(FLAGS.out, cfg, variables, tokenizer=tokenizer)
  return dict(direction="hf->orbax", out=FLAGS.out, **hf.summary(report),
              tokenizer=repr(tokenizer) if tokenizer is not None else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  print(json.dumps(to_hf() if FLAGS.to_hf else from_hf()))


if __name__ == "__main__":
  cli.run(main)
