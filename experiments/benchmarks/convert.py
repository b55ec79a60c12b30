"""Checkpoint-load benchmark: host memory of a streaming FP8 load onto an 8-device mesh.

Writes a synthetic multi-file FP8 checkpoint of a V3-shaped but narrower model (blockwise E4M3 weights with
`weight_scale_inv`, bf16 embedding / head / norms, an MTP layer; the layer count sized to about
`convert_gb` GB), then, in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the device count must be set before jax is imported), loads it with `hf.load(..., mesh=...)` in bf16 and
reports the peak RSS growth of the load (VmHWM from /proc, reset before the load) next to the checkpoint
size, the largest tensor and the bytes the loaded model itself occupies on the (host-memory) CPU devices:
`transient_host_bytes` = peak growth - model bytes is what streaming costs on top of the result.

    python -m experiments.bench --suite=convert              # ~2 GB (--small: ~0.25 GB)
    python -m experiments.benchmarks.convert --convert_gb=1  # any size
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_ENV_SIZE = "DSJ_CONVERT_BENCH_GB"


def bench_config(target_bytes: float):
  """V3's structure (MLA with q_lora, 1 dense layer then MoE with group-limited sigmoid routing, 1 shared
  expert, MTP depth 1) at width 1024 with 64 experts; the layer count gives about target_bytes in FP8."""
  from deepseek_jax.config import ModelConfig, RopeScaling  # pylint: disable=g-import-not-at-top
  base = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
              q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=512,
              first_k_dense_replace=1, n_group=8, topk_group=4, max_position_embeddings=16384,
              rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=4096),
              num_nextn_predict_layers=1)
  d, f, e = base["hidden_size"], base["moe_intermediate_size"], base["n_routed_experts"]
  moe_layer = 3 * d * f * (e + 1) + 2 * d * 256 * 16  # experts + shared (1 byte each) + attention, roughly
  fixed = 2 * 2 * base["vocab_size"] * d * 2             # embedding + head, and their MTP copies, bf16
  layers = max(2, int(round((target_bytes - fixed) / moe_layer)) - 1)  # the MTP block is one more MoE layer
  return ModelConfig(num_hidden_layers=layers, **base)


def write_synthetic(path: str, cfg, block=(128, 128), max_shard_size="500MB", seed=0) -> dict:
  """Writes a random FP8 checkpoint of cfg into path (one tensor in memory at a time)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop import hf, hf_names, safetensors_io  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop.placement import abstract_variables  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]:
    shapes[tuple(k.key for k in kp)] = leaf.shape
  planned = []
  for e in hf_names.entries(cfg):
    shape = hf.hf_shape(e, shapes[(e.collection,) + e.path])
    if e.fp8:
      # E4M3 codes with the top exponent bit and sign cleared: finite, |x| <= 15.
      planned.append(safetensors_io.PlannedTensor(
          e.hf, shape, "F8_E4M3",
          lambda s=shape: (rng.integers(0, 256, s, dtype=np.uint8) & 0x77).view(ml_dtypes.float8_e4m3fn)))
      sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
      planned.append(safetensors_io.PlannedTensor(
          hf_names.scale_name(e.hf), sshape, "F32",
          lambda s=sshape: rng.uniform(1e-4, 1e-3, s).astype(np.float32)))
    elif e.collection == "router":
      planned.append(safetensors_io.PlannedTensor(e.hf, shape, "F32",
                                                  lambda s=shape: rng.normal(0, 0.01, s).astype(np.float32)))
    else:
      planned.append(safetensors_io.PlannedTensor(
          e.hf, shape, "BF16",
          lambda s=shape: rng.normal(0, 0.02, s).astype(np.float32).astype(ml_dtypes.bfloat16)))
  os.makedirs(path, exist_ok=True)
  files = safetensors_io.write_checkpoint(path, planned, max_shard_size)
  config = cfg.to_hf()
  config["torch_dtype"] = "bfloat16"
  config["quantization_config"] = dict(hf.FP8_QUANTIZATION_CONFIG, weight_block_size=list(block))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return dict(checkpoint_bytes=sum(t.nbytes for t in planned), files=len(files), tensors=len(planned),
              largest_tensor_bytes_on_disk=max(t.nbytes for t in planned),
              layers=cfg.num_hidden_layers)


def _proc_status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _child(path: str) -> dict:
  """Runs in the 8-device subprocess: the load itself, with its peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop import hf  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  # Warm up the code paths (imports, tracing) on nothing, so the measurement sees the load only.
  jax.device_put(np.zeros((8,), np.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  rss_before = _proc_status_kb("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    peak_reset = True
  except OSError:
    peak_reset = False
  t0 = time.perf_counter()
  cfg, variables, report = hf.load_with_report(path, dtype=jnp.bfloat16, mesh=mesh)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - t0
  peak = _proc_status_kb("VmHWM")
  model_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
  growth = peak - rss_before
  return dict(devices=jax.device_count(), mesh=dict(mesh.shape), load_seconds=round(seconds, 2),
              read_gb_per_s=round(report.bytes / seconds / 1e9, 3), fp8_dequantized=report.fp8_dequantized,
              tensors_read=report.tensors, mtp_layers=report.mtp_layers,
              largest_tensor_bytes_loaded=report.largest_tensor_bytes, model_bytes_on_devices=model_bytes,
              rss_before=rss_before, peak_rss_growth=growth, peak_reset=peak_reset,
              transient_host_bytes=growth - model_bytes, layers_loaded=cfg.num_hidden_layers)


def run(flags=None) -> dict:
  """The suite: write the synthetic checkpoint, load it in an 8-device subprocess, return the JSON dict."""
  gb = getattr(flags, "convert_gb", None) if flags is not None else None
  if gb is None:
    raw = os.environ.get(_ENV_SIZE, 0.25 if getattr(flags, "small", False) else 2.0)
    try:
      gb = float(raw)
    except ValueError:
      gb = float("nan")
    if not gb > 0:
      raise ValueError(f"{_ENV_SIZE}={raw!r}: expected a positive size in GB")
  elif not gb > 0:
    raise ValueError(f"--convert_gb={gb}: expected a positive size in GB")
  cfg = bench_config(gb * 1e9)
  work = tempfile.mkdtemp(prefix="dsj-convert-bench-")
  try:
    t0 = time.perf_counter()
    written = write_synthetic(os.path.join(work, "ckpt"), cfg)
    written["write_seconds"] = round(time.perf_counter() - t0, 2)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "experiments.benchmarks.convert", "--child",
                        os.path.join(work, "ckpt")], env=env, cwd=repo, capture_output=True, text=True)
    if r.returncode != 0:
      raise RuntimeError(f"load subprocess failed:\n{r.stderr[-4000:]}")
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
  finally:
    shutil.rmtree(work, ignore_errors=True)
  out = dict(suite="convert", target_gb=gb, **written, **loaded)
  out["peak_rss_growth_over_checkpoint"] = round(out["peak_rss_growth"] / out["checkpoint_bytes"], 3)
  out["transient_over_largest_tensor"] = round(out["transient_host_bytes"] /
                                               out["largest_tensor_bytes_loaded"], 2)
  return out


def main():
  if len(sys.argv) >= 3 and sys.argv[1] == "--child":
    print(json.dumps(_child(sys.argv[2])))
    return
  import argparse  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--convert_gb", type=float, default=2.0, help="checkpoint size in GB")
  parser.error = cli.fail   # one line and exit status 2, as every entry point
  args = parser.parse_args()
  try:
    result = run(args)
  except ValueError as e:
    cli.fail(str(e))
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
