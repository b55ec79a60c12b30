"""What a training run costs: parameters, FLOPs and KV cache per token, GPU-hours, dollars, implied MFU.

    python -m experiments.costs                                   # DeepSeek-V3 as reported (Table 1)
    python -m experiments.costs --preset=small --tokens=2e9 --seq_len=2048 --gpu=H200 --mfu=0.35
    python -m experiments.costs --config=experiments/configs/tiny.py --format=json
    python -m experiments.costs --config=experiments/configs/v3.py     # + memory and communication plan
    python -m experiments.costs --mesh=fsdp:32,expert:64 --batch_size=16384 --grad_accum=8 --recipe=bf16 \
        --moment_dtype=bfloat16 --remat_policy=full --capacity_factor=2

The memory plan (`deepseek_jax.analysis.memory`) prints every per-device term, the routed rows per token
(expected and the dispatch's bound) and a verdict against the GPU's memory; the communication plan the bytes
each device sends per step on each mesh axis and their time next to the compute time.
"""

from __future__ import annotations

import json
from typing import Optional

from absl import flags

from deepseek_jax.analysis import cost, hardware, memory
from deepseek_jax.config import ModelConfig
from deepseek_jax.sharding import ZERO1_AXES
from experiments import cli

_PRESET = flags.DEFINE_string("preset", "deepseek-v3", "ModelConfig preset (ignored with --config).")
_CONFIG = cli.DEFINE_config_file(
    "config", None, "Experiment config file (get_config()); its model.preset and model.* define the model, "
    "and steps x batch_size x seq_len the default tokens.", lock_config=False)
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"], "Output format.")
_TOKENS = flags.DEFINE_float("tokens", None, "Training tokens (default: the config's run, else 14.8T).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the config's, else 4096).")
_GPU = flags.DEFINE_string("gpu", cost.V3_GPU, "Accelerator: H800, H100, H200, B200.")
_GPU_HOURS = flags.DEFINE_float("gpu_hours", None, "Known GPU-hours of the run (gives the implied MFU).")
_MFU = flags.DEFINE_float("mfu", None, "Assumed MFU (gives the GPU-hours).")
_PRECISION = flags.DEFINE_enum("precision", "bf16", ["bf16", "fp8"], "Peak the MFU refers to (the precision "
                                "recipe is --recipe).")
_PRICE = flags.DEFINE_float("price_per_gpu_hour", cost.V3_PRICE_PER_GPU_HOUR, "USD per GPU-hour.")
_NUM_GPUS = flags.DEFINE_integer("num_gpus", cost.V3_NUM_GPUS, "GPUs, for the wall-clock figure and a config "
                                 "mesh's -1 axis.")
_MESH = flags.DEFINE_string("mesh", None, "Also print the per-device memory and communication plan on this mesh, "
                            "e.g. fsdp:32,expert:64 (axes data, fsdp, expert, tensor; default: the config's "
                            "mesh, its -1 axis taking the rest of --num_gpus).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Memory plan: global sequences per step (default: the "
                              "config's, else one per token-sharding device and microbatch).")
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum", None, "Memory plan: microbatches per step (default: the "
                                   "config's, else 1).")
_RECIPE = flags.DEFINE_enum("recipe", None, ["fp32", "bf16", "fp8"], "Precision recipe (default: the "
                            "config's, else fp32): bf16 and fp8 compute in bfloat16 with float32 parameters.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                 "Parameter (and gradient) dtype (default: the recipe's).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16", "float16"],
                                   "Activation dtype (default: the recipe's).")
_MOMENT_DTYPE = flags.DEFINE_enum("moment_dtype", None, ["float32", "bfloat16"],
                                  "AdamW moment dtype (default: the config's optimizer.mu_dtype, else float32).")
_REMAT = flags.DEFINE_enum("remat_policy", None, ["none", "full", "dots", "dots_with_no_batch_dims"],
                           "Memory plan: activation checkpointing (default: the model's).")
_CAPACITY = flags.DEFINE_float("capacity_factor", None, "Memory plan: expert-parallel capacity as a multiple of "
                               "the balanced share (default: the model's moe_capacity_factor; none = dropless).")
_ATTENTION = flags.DEFINE_enum("attention_impl", "pallas", ["pallas", "xla"], "Memory plan: the flash kernel "
                               "of GPU runs, or the XLA attention that keeps its probabilities.")
_ZERO1 = flags.DEFINE_bool("zero1", None, "Memory plan: optimizer state also split over the data axis, as the "
                           "trainer's config.zero1 does (default: the config's zero1, else off).")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "Communication plan: GPUs per NVLink node.")
_CAUSAL = flags.DEFINE_bool("causal", True, "Count causal-average attention ((S+1)/2 keys), else all S.")


class CostsError(ValueError):
  """A mistake in what the command line asked for: printed on one line, exit status 2."""


def model_config_from_experiment(config, recipe: Optional[str] = None, **overrides) -> ModelConfig:
  """The ModelConfig of an experiment config, as training builds it (`training.config.model_config`):
  `model.preset`, the `model.<field>` entries that are set, and `precision`; then `overrides` (fields left
  None are not changed).

  Args:
    config: an ml_collections ConfigDict with a `model` section (missing fields take the defaults of
      `training.config.default_config`).
    recipe: precision recipe replacing the config's `precision` ('fp32', 'bf16', 'fp8').
    **overrides: ModelConfig fields to change.
  Returns:
    The validated ModelConfig.
  Raises:
    CostsError naming the field.
  """
  from deepseek_jax.training.config import default_config, model_config  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.errors import UserError  # pylint: disable=g-import-not-at-top
  if "model" not in config:
    raise CostsError("experiment config has no `model` section")
  model = config["model"]
  model = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  if not model.get("preset"):
    raise CostsError("experiment config field model.preset is missing")
  full = default_config()
  for name, value in model.items():
    if name not in full.model:
      raise CostsError(f"experiment config field model.{name} is not a ModelConfig field")
    if value is not None:
      full.model[name] = value
  full.precision = recipe or (config.get("precision") if hasattr(config, "get") else None) or "fp32"
  try:
    cfg = model_config(full)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg
  except (UserError, ValueError, TypeError) as e:
    raise CostsError(str(e)) from e


def _run_settings():
  """(cfg, tokens, seq_len, experiment config or None) from the flags."""
  exp = _CONFIG.value
  overrides = dict(param_dtype=_PARAM_DTYPE.value, dtype=_COMPUTE_DTYPE.value, remat_policy=_REMAT.value)
  if _CAPACITY.value is not None:
    overrides["moe_capacity_factor"] = _CAPACITY.value
  if exp is None:
    cfg = model_config_from_experiment({"model": {"preset": _PRESET.value}}, _RECIPE.value, **overrides)
    seq_len = _SEQ_LEN.value or cost.V3_PRETRAIN_SEQ_LEN
    tokens = _TOKENS.value or cost.V3_PRETRAIN_TOKENS
    return cfg, tokens, seq_len, None
  if flags.FLAGS["preset"].present:
    raise CostsError("give --preset or --config, not both")
  cfg = model_config_from_experiment(exp, _RECIPE.value, **overrides)
  seq_len = _SEQ_LEN.value or exp.get("seq_len") or cost.V3_PRETRAIN_SEQ_LEN
  tokens = _TOKENS.value
  if tokens is None:
    if exp.get("steps") and exp.get("batch_size"):
      tokens = float(exp.steps * exp.batch_size * seq_len)
    else:
      tokens = cost.V3_PRETRAIN_TOKENS
  return cfg, tokens, seq_len, exp


def _mesh_sizes(exp) -> Optional[dict]:
  """The memory plan's mesh: --mesh, else the config's; its -1 axis takes the rest of --num_gpus when that is
  given, else size 1 (the smallest mesh the config allows)."""
  if _MESH.value:
    return memory.parse_mesh(_MESH.value)
  if exp is None or "mesh" not in exp:
    return None
  from deepseek_jax.sharding import MeshError, mesh_shape  # pylint: disable=g-import-not-at-top
  mesh = {k: int(v) for k, v in exp.mesh.items()}
  if -1 in mesh.values() and not flags.FLAGS["num_gpus"].present:
    return {k: max(v, 1) for k, v in mesh.items()}
  try:
    return mesh_shape(**mesh, num_devices=_NUM_GPUS.value) if -1 in mesh.values() else mesh
  except MeshError as e:
    raise CostsError(f"{e} (--num_gpus={_NUM_GPUS.value})") from e


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


def plans(cfg, seq_len, exp, gpu_name) -> Optional[dict]:
  """The memory plan and the communication plan of the flags, or None without a mesh."""
  sizes = _mesh_sizes(exp)
  if sizes is None:
    return None
  accum = _GRAD_ACCUM.value or (int(exp.get("grad_accum", 1)) if exp is not None else 1)
  tokens_axes = sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1)
  batch = _BATCH.value or (int(exp.batch_size) if exp is not None and exp.get("batch_size")
                           else tokens_axes * accum)
  moments = _MOMENT_DTYPE.value or (exp.optimizer.get("mu_dtype", "float32") if exp is not None
                                    and "optimizer" in exp else "float32")
  zero1 = _ZERO1.value if _ZERO1.value is not None else bool(exp is not None and exp.get("zero1", False))
  gpu = hardware.get_gpu(gpu_name)
  plan = memory.memory_plan(cfg, sizes, batch_size=batch, seq_len=seq_len, grad_accum=accum,
                            moment_dtype=moments, zero1_axes=ZERO1_AXES if zero1 else (),
                            attention_impl=_ATTENTION.value, hbm_gb=gpu.hbm_gb)
  # Default MFU: what DeepSeek-V3's reported pre-training GPU-hours imply (cost.deepseek_v3_report).
  mfu = _MFU.value or cost.deepseek_v3_report()["implied_mfu"]["pre-training"][_PRECISION.value]
  comm = memory.communication_plan(cfg, plan, gpu=gpu, gpus_per_node=_GPUS_PER_NODE.value, mfu=mfu,
                                   precision=_PRECISION.value)
  return {"memory": plan, "communication": comm}


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  from deepseek_jax.training.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    cfg, tokens, seq_len, exp = _run_settings()
    report = cost.cost_report(cfg, tokens=tokens, seq_len=seq_len, gpu=_GPU.value,
                              gpu_hours=_GPU_HOURS.value, mfu=_MFU.value, precision=_PRECISION.value,
                              price_per_gpu_hour=_PRICE.value, num_gpus=_NUM_GPUS.value,
                              causal=_CAUSAL.value)
    extra = plans(cfg, seq_len, exp, _GPU.value)
  except (CostsError, UserError, ValueError) as e:
    cli.fail(str(e))
  if extra:
    report.update(extra)
  if _FORMAT.value == "json":
    print(json.dumps(report, indent=2))
  else:
    print(format_table(report))
    if extra:
      print("\nMemory per device\n" + memory.format_memory_plan(extra["memory"]))
      print("\nCommunication per step\n" + memory.format_communication(extra["communication"]))


if __name__ == "__main__":
  cli.run(main)
