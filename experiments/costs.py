"""What a training run costs: parameters, FLOPs and KV cache per token, GPU-hours, dollars, implied MFU.

    python -m experiments.costs                                   # DeepSeek-V3 as reported (Table 1)
    python -m experiments.costs --preset=small --tokens=2e9 --seq_len=2048 --gpu=H200 --mfu=0.35
    python -m experiments.costs --config=experiments/configs/tiny.py --format=json
    python -m experiments.costs --mesh=data:32,expert:64 --batch_size=2048 --remat_policy=full  # + memory
"""

from __future__ import annotations

import dataclasses
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from deepseek_jax.analysis import cost, memory
from deepseek_jax.config import ModelConfig

_PRESET = flags.DEFINE_string("preset", "deepseek-v3", "ModelConfig preset (ignored with --config).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config()); its model.preset and model.* define the model, "
    "and steps x batch_size x seq_len the default tokens.", lock_config=False)
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"], "Output format.")
_TOKENS = flags.DEFINE_float("tokens", None, "Training tokens (default: the config's run, else 14.8T).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the config's, else 4096).")
_GPU = flags.DEFINE_string("gpu", cost.V3_GPU, "Accelerator: H800, H100, H200, B200.")
_GPU_HOURS = flags.DEFINE_float("gpu_hours", None, "Known GPU-hours of the run (gives the implied MFU).")
_MFU = flags.DEFINE_float("mfu", None, "Assumed MFU (gives the GPU-hours).")
_PRECISION = flags.DEFINE_enum("precision", "bf16", ["bf16", "fp8"], "Peak the MFU refers to.")
_PRICE = flags.DEFINE_float("price_per_gpu_hour", cost.V3_PRICE_PER_GPU_HOUR, "USD per GPU-hour.")
_NUM_GPUS = flags.DEFINE_integer("num_gpus", cost.V3_NUM_GPUS, "GPUs, for the wall-clock figure.")
_MESH = flags.DEFINE_string("mesh", None, "Also print the per-device memory plan on this mesh, e.g. "
                            "data:32,expert:64 (axes data, fsdp, expert, tensor).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global sequences processed at once for the memory plan "
                              "(one microbatch); default one per token-sharding device.")
_REMAT = flags.DEFINE_string("remat_policy", None, "Memory plan: none, full, dots, dots_with_no_batch_dims "
                             "(default: the model's).")
_OPT_DTYPE = flags.DEFINE_enum("opt_dtype", "float32", ["float32", "bfloat16"], "Memory plan: AdamW moments.")
_ZERO1 = flags.DEFINE_bool("zero1", True, "Memory plan: shard optimizer state over the data axis (ZeRO-1).")
_CAUSAL = flags.DEFINE_bool("causal", True, "Count causal-average attention ((S+1)/2 keys), else all S.")


def model_config_from_experiment(config) -> ModelConfig:
  """The ModelConfig of an experiment config: `model.preset` plus any `model.<field>` override.

  Args:
    config: an ml_collections ConfigDict (or mapping) with a `model` section.

  Returns:
    The validated ModelConfig.
  """
  if "model" not in config:
    raise ValueError("experiment config has no `model` section")
  model = config["model"]
  model = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  preset = model.pop("preset", None)
  if not preset:
    raise ValueError("experiment config field model.preset is missing")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  for name in sorted(model):
    if name not in known:
      raise ValueError(f"experiment config field model.{name} is not a ModelConfig field")
  return ModelConfig.preset(preset, **model)


def _run_settings():
  """(cfg, tokens, seq_len) from the flags."""
  exp = _CONFIG.value
  if exp is None:
    cfg = ModelConfig.preset(_PRESET.value)
    seq_len = _SEQ_LEN.value or cost.V3_PRETRAIN_SEQ_LEN
    tokens = _TOKENS.value or cost.V3_PRETRAIN_TOKENS
    return cfg, tokens, seq_len
  if flags.FLAGS["preset"].present:
    raise app.UsageError("give --preset or --config, not both")
  cfg = model_config_from_experiment(exp)
  seq_len = _SEQ_LEN.value or exp.get("seq_len") or cost.V3_PRETRAIN_SEQ_LEN
  tokens = _TOKENS.value
  if tokens is None:
    if exp.get("steps") and exp.get("batch_size"):
      tokens = float(exp.steps * exp.batch_size * seq_len)
    else:
      tokens = cost.V3_PRETRAIN_TOKENS
  return cfg, tokens, seq_len


def _si(x, unit=""):
  if x is None:
    return "n/a"
  for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
    if abs(x) >= div:
      return f"{x / div:,.3f} {prefix}{unit}".rstrip()
  return f"{x:,.3f} {unit}".rstrip()


def format_table(r: dict) -> str:
  """A readable, aligned text table of a cost report."""
  f = r["forward_flops_per_token"]
  rows = [
      ("parameters, total", _si(r["params_total"])),
      ("parameters, active per token", _si(r["params_active"])),
      ("parameters, MTP module", _si(r["params_mtp"])),
      ("KV cache per token (MLA, bf16)", f"{r['kv_cache_bytes_per_token']:,} B"),
      ("KV cache per token (MHA, bf16)", f"{r['kv_cache_bytes_per_token_mha']:,} B"),
      (f"forward FLOPs/token at S={r['seq_len']}", _si(f["total"], "FLOP")),
      ("  MLA projections", _si(f["mla_projections"], "FLOP")),
      ("  attention scores + values", _si(f["attention"], "FLOP")),
      ("  routed experts", _si(f["routed_experts"], "FLOP")),
      ("  shared experts", _si(f["shared_experts"], "FLOP")),
      ("  dense MLP layers", _si(f["dense_mlp"], "FLOP")),
      ("  router", _si(f["router"], "FLOP")),
      ("  head", _si(f["head"], "FLOP")),
      ("  MTP (eh_proj + block + head)", _si(f["mtp"], "FLOP")),
      ("train FLOPs/token (3x forward)", _si(r["train_flops_per_token"], "FLOP")),
      (f"  with recompute ({r['remat_policy']})", _si(r["train_hardware_flops_per_token"], "FLOP")),
      ("  6 x active parameters", _si(r["six_n_active_flops_per_token"], "FLOP")),
      ("attention convention", r["attention_convention"]),
      ("tokens", _si(r["tokens"])),
      ("total training FLOPs", f"{r['total_flops']:.4e}"),
      (f"GPU ({r['precision']} dense peak)", f"{r['gpu']} ({r['peak_tflops']:,.1f} TFLOP/s)"),
      ("GPU-hours", f"{_si(r['gpu_hours'])} ({r['gpu_hours_source']})"),
      (f"cost at ${r['price_per_gpu_hour']:g}/GPU-hour", f"${_si(r['cost_usd'])}"),
      ("MFU (bf16 peak / fp8 peak)",
       f"{100 * r['implied_mfu_bf16']:.1f}% / {100 * r['implied_mfu_fp8']:.1f}%"),
      (f"wall clock on {r['num_gpus']:,} GPUs", f"{r['wall_days']:,.3g} days"),
  ]
  lines = _aligned(rows)
  if "table1" in r:
    lines += ["", "DeepSeek-V3 Table 1 (H800 GPU-hours, USD)"]
    lines += _aligned([(row["stage"], f"{row['gpu_hours'] / 1e3:>8,.0f}K  {'$%.3fM' % (row['cost_usd'] / 1e6):>8}")
                       for row in r["table1"]])
    per_t = r["gpu_hours_per_trillion_tokens"]
    lines.append(f"{per_t / 1e3:,.0f}K GPU-hours per trillion tokens = "
                 f"{cost.wall_days(per_t, cost.V3_NUM_GPUS):.1f} days on {cost.V3_NUM_GPUS:,} GPUs")
    fl = r["fleet"]
    pe, dv = fl["press_estimates"], fl["derived"]
    lines += ["", f"Fleet view ({pe['note']})"]
    lines += _aligned([
        ("run: GPUs, wall clock", f"{fl['run']['gpus']:,}, {fl['run']['wall_days']:.1f} days"),
        ("run: rented GPU cost", f"${fl['run']['cost_usd'] / 1e6:,.3f}M"),
        ("press: Hopper GPUs", f"~{pe['fleet_gpus']:,}"),
        ("press: server capex", f"~${pe['server_capex_usd'] / 1e9:,.2f}B"),
        ("press: operating cost", f"~${pe['operating_cost_usd'] / 1e6:,.0f}M"),
        ("derived: capex per GPU", f"${dv['server_capex_per_gpu_usd']:,.0f}"),
        (f"derived: capex of {fl['run']['gpus']:,} GPUs", f"${dv['run_cluster_capex_usd'] / 1e6:,.1f}M"),
        ("derived: run cost / that capex", f"{100 * dv['run_cost_over_run_cluster_capex']:.1f}%"),
        ("derived: fleet rented for a year", f"${dv['fleet_rental_usd_per_year'] / 1e6:,.0f}M"),
    ])
  lines += [f"note: {n}" for n in r["notes"]]
  return "\n".join(lines)


def _aligned(rows):
  width = max(len(k) for k, _ in rows)
  return [f"{k:<{width}}  {v}" for k, v in rows]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg, tokens, seq_len = _run_settings()
  report = cost.cost_report(cfg, tokens=tokens, seq_len=seq_len, gpu=_GPU.value,
                            gpu_hours=_GPU_HOURS.value, mfu=_MFU.value, precision=_PRECISION.value,
                            price_per_gpu_hour=_PRICE.value, num_gpus=_NUM_GPUS.value,
                            causal=_CAUSAL.value)
  if _MESH.value:
    sizes = memory.parse_mesh(_MESH.value)
    batch = _BATCH.value or sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1)
    report["memory"] = memory.memory_plan(cfg, sizes, batch_size=batch, seq_len=seq_len,
                                          opt_dtype=_OPT_DTYPE.value, remat_policy=_REMAT.value,
                                          zero1_axes=("data",) if _ZERO1.value else ())
  if _FORMAT.value == "json":
    print(json.dumps(report, indent=2))
  else:
    print(format_table(report))
    if "memory" in report:
      print("\nMemory per device\n" + memory.format_memory_plan(report["memory"]))


if __name__ == "__main__":
  app.run(main)
