"""Checkpoint conversion between HF safetensors and the project's orbax model checkpoints.

    python -m experiments.convert --hf_dir=DeepSeek-V3 --out=ckpt/v3 [--dtype=bfloat16] [--mesh_expert=8]
    python -m experiments.convert --to_hf --orbax_dir=ckpt/v3 --out=hf/v3 [--fp8] [--max_shard_size=5GB]

HF -> orbax reads (dequantizing FP8 blocks) with `deepseek_jax.interop.hf.load` and writes with
`deepseek_jax.interop.orbax_io.save_variables`; --to_hf goes back with `hf.save`.  Prints a JSON summary.
"""

import json
import sys

from absl import app, flags

flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to read (config.json + *.safetensors).")
flags.DEFINE_string("orbax_dir", None, "orbax model checkpoint to read (with --to_hf).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_bool("to_hf", False, "Convert an orbax checkpoint (--orbax_dir) to HF safetensors.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype of the converted model.")
flags.DEFINE_bool("fp8", False, "With --to_hf: write the released FP8 layout (blockwise E4M3).")
flags.DEFINE_string("max_shard_size", "5GB", "With --to_hf: bytes per safetensors file.")
flags.DEFINE_bool("strict", True, "Fail on checkpoint tensors the model has no place for.")
flags.DEFINE_integer("mesh_fsdp", 1, "Load onto a mesh with this many fsdp shards (1 with the others: none).")
flags.DEFINE_integer("mesh_expert", 1, "Expert-parallel shards of the load mesh.")
flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel shards of the load mesh.")
FLAGS = flags.FLAGS


def _mesh():
  import jax  # pylint: disable=g-import-not-at-top
  shape = (FLAGS.mesh_fsdp, FLAGS.mesh_expert, FLAGS.mesh_tensor)
  if shape == (1, 1, 1):
    return None
  return jax.make_mesh(shape, ("fsdp", "expert", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def main(argv):
  del argv
  from deepseek_jax.interop import hf, orbax_io  # pylint: disable=g-import-not-at-top
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if FLAGS.to_hf:
    if not FLAGS.orbax_dir:
      raise app.UsageError("--to_hf reads --orbax_dir")
    cfg, variables = orbax_io.load_variables(FLAGS.orbax_dir)
    files = hf.save(FLAGS.out, cfg, variables, fp8=FLAGS.fp8, max_shard_size=FLAGS.max_shard_size,
                    progress=True)
    summary = dict(direction="orbax->hf", out=FLAGS.out, files=len(files), fp8=FLAGS.fp8,
                   mtp_layers=cfg.num_nextn_predict_layers)
  else:
    if not FLAGS.hf_dir:
      raise app.UsageError("--hf_dir is required (or --to_hf with --orbax_dir)")
    try:
      cfg, variables, report = hf.load_with_report(FLAGS.hf_dir, dtype=FLAGS.dtype, mesh=_mesh(),
                                                   strict=FLAGS.strict, progress=True)
    except (ValueError, FileNotFoundError) as e:  # hf.CheckpointError is a ValueError: one line, status 2
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    orbax_io.save_variables(FLAGS.out, cfg, variables)
    summary = dict(direction="hf->orbax", out=FLAGS.out, **hf.summary(report))
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
