"""GPU-hours and dollars of a training run, the MFU a reported budget implies, and DeepSeek-V3's Table 1.

The model is the usual one: total FLOPs = tokens x training FLOPs per token (`flops.train_flops_per_token`,
model FLOPs: 3x forward, no recomputation), and

    GPU-hours = total FLOPs / (peak FLOP/s per GPU x MFU x 3600),      cost = GPU-hours x price.

Read backwards, a reported GPU-hour budget gives the MFU it implies.  Peaks are dense vendor figures
(`hardware.GPUS`); "bf16" is the usual MFU reference even for FP8 training, "fp8" gives the stricter one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from deepseek_jax.analysis import flops as flops_lib
from deepseek_jax.analysis import hardware
from deepseek_jax.config import ModelConfig

SECONDS_PER_HOUR = 3600.0


@dataclasses.dataclass(frozen=True)
class RunCost:
  """Cost of one training run.

  Attributes:
    tokens: training tokens.
    flops_per_token: training FLOPs per token (model FLOPs).
    total_flops: tokens x flops_per_token.
    gpu: accelerator name (a key of hardware.GPUS).
    precision: the peak MFU refers to (bf16 | fp8).
    peak_flops: that peak, FLOP/s per GPU.
    mfu: model FLOPs utilization (achieved / peak).
    gpu_hours: GPU-hours.
    price_per_gpu_hour: USD per GPU-hour.
    cost_usd: gpu_hours x price_per_gpu_hour.
  """
  tokens: float
  flops_per_token: float
  total_flops: float
  gpu: str
  precision: str
  peak_flops: float
  mfu: float
  gpu_hours: float
  price_per_gpu_hour: float
  cost_usd: float

  def wall_days(self, num_gpus: int) -> float:
    """Days of wall clock on `num_gpus` GPUs."""
    return wall_days(self.gpu_hours, num_gpus)

  def as_dict(self) -> dict:
    """The fields as a dict."""
    return dataclasses.asdict(self)


def wall_days(gpu_hours: float, num_gpus: int) -> float:
  """Days of wall clock that `gpu_hours` take on `num_gpus` GPUs.

  Args:
    gpu_hours: GPU-hours.
    num_gpus: GPUs running in parallel.

  Returns:
    gpu_hours / num_gpus / 24.
  """
  if num_gpus <= 0:
    raise ValueError(f"num_gpus={num_gpus!r} must be positive")
  return gpu_hours / num_gpus / 24.0


def gpu_hours_for_flops(total_flops: float, *, gpu: str = "H800", mfu: float,
                        precision: str = "bf16") -> float:
  """GPU-hours to execute `total_flops` at `mfu` of the dense peak.

  Args:
    total_flops: FLOPs of the run.
    gpu: a key of hardware.GPUS.
    mfu: model FLOPs utilization in (0, 1].
    precision: bf16 | fp8 peak.

  Returns:
    GPU-hours.
  """
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu!r} must be in (0, 1]")
  peak = hardware.get_gpu(gpu).peak_flops(precision)
  return total_flops / (peak * mfu * SECONDS_PER_HOUR)


def implied_mfu_from_flops(total_flops: float, gpu_hours: float, *, gpu: str = "H800",
                           precision: str = "bf16") -> float:
  """The MFU at which `total_flops` take `gpu_hours`.

  Args:
    total_flops: FLOPs of the run.
    gpu_hours: GPU-hours it took.
    gpu: a key of hardware.GPUS.
    precision: bf16 | fp8 peak.

  Returns:
    achieved FLOP/s per GPU / peak.
  """
  if gpu_hours <= 0:
    raise ValueError(f"gpu_hours={gpu_hours!r} must be positive")
  peak = hardware.get_gpu(gpu).peak_flops(precision)
  return total_flops / (gpu_hours * SECONDS_PER_HOUR * peak)


def implied_mfu(tokens: float, flops_per_token: float, gpu_hours: float, *, gpu: str = "H800",
                precision: str = "bf16") -> float:
  """The MFU a reported budget implies: tokens x flops_per_token / (gpu_hours x 3600 x peak).

  Args:
    tokens: training tokens.
    flops_per_token: training FLOPs per token.
    gpu_hours: reported GPU-hours.
    gpu: a key of hardware.GPUS.
    precision: bf16 | fp8 peak.

  Returns:
    The implied MFU.
  """
  return implied_mfu_from_flops(tokens * flops_per_token, gpu_hours, gpu=gpu, precision=precision)


def estimate_run(tokens: float, flops_per_token: float, *, mfu: float, gpu: str = "H800",
                 precision: str = "bf16", price_per_gpu_hour: float = 2.0) -> RunCost:
  """A run's GPU-hours and cost at an assumed MFU.

  Args:
    tokens: training tokens.
    flops_per_token: training FLOPs per token.
    mfu: assumed model FLOPs utilization.
    gpu: a key of hardware.GPUS.
    precision: bf16 | fp8 peak the MFU refers to.
    price_per_gpu_hour: USD per GPU-hour.

  Returns:
    A `RunCost`.
  """
  total = tokens * flops_per_token
  hours = gpu_hours_for_flops(total, gpu=gpu, mfu=mfu, precision=precision)
  g = hardware.get_gpu(gpu)
  return RunCost(tokens=tokens, flops_per_token=flops_per_token, total_flops=total, gpu=g.name,
                 precision=precision, peak_flops=g.peak_flops(precision), mfu=mfu, gpu_hours=hours,
                 price_per_gpu_hour=price_per_gpu_hour, cost_usd=hours * price_per_gpu_hour)


def run_from_gpu_hours(tokens: float, flops_per_token: float, gpu_hours: float, *, gpu: str = "H800",
                       precision: str = "bf16", price_per_gpu_hour: float = 2.0) -> RunCost:
  """A run with a known GPU-hour budget: its cost and implied MFU.

  Args:
    tokens: training tokens.
    flops_per_token: training FLOPs per token.
    gpu_hours: GPU-hours spent.
    gpu: a key of hardware.GPUS.
    precision: bf16 | fp8 peak for the implied MFU.
    price_per_gpu_hour: USD per GPU-hour.

  Returns:
    A `RunCost` whose mfu is the implied MFU.
  """
  total = tokens * flops_per_token
  g = hardware.get_gpu(gpu)
  mfu = implied_mfu_from_flops(total, gpu_hours, gpu=gpu, precision=precision)
  return RunCost(tokens=tokens, flops_per_token=flops_per_token, total_flops=total, gpu=g.name,
                 precision=precision, peak_flops=g.peak_flops(precision), mfu=mfu,
                 gpu_hours=gpu_hours, price_per_gpu_hour=price_per_gpu_hour,
                 cost_usd=gpu_hours * price_per_gpu_hour)


# ------------------------------------------------------------------ DeepSeek-V3 (arXiv 2412.19437)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of DeepSeek-V3's Table 1.

  Attributes:
    name: stage.
    gpu_hours: reported H800 GPU-hours.
    phases: (tokens, seq_len) of the training phases of the stage, where the report gives them
      (empty where it does not: post-training reports samples, not tokens).
  """
  name: str
  gpu_hours: float
  phases: tuple = ()

  @property
  def tokens(self) -> float:
    """Tokens of the stage (0 where the report gives none)."""
    return float(sum(t for t, _ in self.phases))


V3_GPU = "H800"
V3_NUM_GPUS = 2048
V3_PRICE_PER_GPU_HOUR = 2.0
V3_PRETRAIN_TOKENS = 14.8e12
V3_PRETRAIN_SEQ_LEN = 4096
# Table 1; context extension phases from section 4.3 (1000 steps at 32K x 1920, 1000 at 128K x 480).
V3_STAGES: tuple[Stage, ...] = (
    Stage("pre-training", 2664e3, ((V3_PRETRAIN_TOKENS, V3_PRETRAIN_SEQ_LEN),)),
    Stage("context extension", 119e3, ((1000 * 1920 * 32768, 32768), (1000 * 480 * 131072, 131072))),
    Stage("post-training", 5e3),
)
# Press estimates of the whole fleet behind DeepSeek (as reported, e.g. by SemiAnalysis, January 2025);
# they are not part of the report's Table 1, which covers the final run's GPU time only.
PRESS_FLEET_GPUS = 50_000
PRESS_SERVER_CAPEX_USD = 1.6e9
PRESS_OPERATING_COST_USD = 944e6


def table1(stages: Sequence[Stage] = V3_STAGES,
           price_per_gpu_hour: float = V3_PRICE_PER_GPU_HOUR) -> list[dict]:
  """DeepSeek-V3's Table 1: GPU-hours and USD per stage, and the total.

  Args:
    stages: the stages (DeepSeek-V3's by default).
    price_per_gpu_hour: USD per H800 GPU-hour (the report's $2).

  Returns:
    One dict per stage and a last "total" row, each with stage, gpu_hours, cost_usd.
  """
  rows = [dict(stage=s.name, gpu_hours=s.gpu_hours, cost_usd=s.gpu_hours * price_per_gpu_hour)
          for s in stages]
  total = sum(s.gpu_hours for s in stages)
  rows.append(dict(stage="total", gpu_hours=total, cost_usd=total * price_per_gpu_hour))
  return rows


def stage_flops(cfg: ModelConfig, stage: Stage, *, causal: bool = True) -> float:
  """Training FLOPs of a stage: sum over its phases of tokens x train FLOPs per token at the phase's length.

  Args:
    cfg: the model.
    stage: a Stage with phases.
    causal: attention convention (see flops.attended_keys).

  Returns:
    Total model FLOPs.
  """
  if not stage.phases:
    raise ValueError(f"stage {stage.name!r} has no (tokens, seq_len) phases to count FLOPs from")
  return float(sum(t * flops_lib.train_flops_per_token(cfg, s, causal=causal).model
                   for t, s in stage.phases))


def fleet_view(run_gpu_hours: float = sum(s.gpu_hours for s in V3_STAGES), *,
               run_gpus: int = V3_NUM_GPUS, price_per_gpu_hour: float = V3_PRICE_PER_GPU_HOUR,
               fleet_gpus: int = PRESS_FLEET_GPUS, server_capex_usd: float = PRESS_SERVER_CAPEX_USD,
               operating_cost_usd: float = PRESS_OPERATING_COST_USD) -> dict:
  """The run's rented-GPU cost beside the capital cost of the hardware.

  Args:
    run_gpu_hours: GPU-hours of the run (Table 1 total by default).
    run_gpus: GPUs of the run's cluster (2048 H800).
    price_per_gpu_hour: USD per GPU-hour.
    fleet_gpus: press estimate of the fleet (about 50,000 Hopper GPUs).
    server_capex_usd: press estimate of the fleet's server cost (about $1.6B).
    operating_cost_usd: press estimate of its operating cost (about $944M).

  Returns:
    dict: the run (gpu_hours, cost_usd, wall_days), the press estimates (labelled), and derived
    figures: server cost per GPU, capital cost of a run_gpus cluster at that rate, run cost as a share
    of each, and the fleet's yearly cost if rented at price_per_gpu_hour.
  """
  run_cost = run_gpu_hours * price_per_gpu_hour
  per_gpu = server_capex_usd / fleet_gpus
  cluster_capex = per_gpu * run_gpus
  return dict(
      run=dict(gpus=run_gpus, gpu_hours=run_gpu_hours, cost_usd=run_cost,
               wall_days=wall_days(run_gpu_hours, run_gpus)),
      press_estimates=dict(
          note="press estimates outside the report's Table 1, not figures from DeepSeek",
          fleet_gpus=fleet_gpus, server_capex_usd=server_capex_usd,
          operating_cost_usd=operating_cost_usd),
      derived=dict(
          server_capex_per_gpu_usd=per_gpu,
          run_cluster_capex_usd=cluster_capex,
          run_cost_over_run_cluster_capex=run_cost / cluster_capex,
          run_cost_over_fleet_capex=run_cost / server_capex_usd,
          fleet_rental_usd_per_year=fleet_gpus * 24 * 365 * price_per_gpu_hour),
  )


def deepseek_v3_report(cfg: Optional[ModelConfig] = None, *, causal: bool = True,
                       price_per_gpu_hour: float = V3_PRICE_PER_GPU_HOUR) -> dict:
  """DeepSeek-V3's costs: Table 1, per-trillion-token figures, implied MFU per stage, fleet view.

  Args:
    cfg: the model (the deepseek-v3 preset by default).
    causal: attention convention for the FLOP count.
    price_per_gpu_hour: USD per GPU-hour.

  Returns:
    dict with table1, gpu_hours_per_trillion_tokens, days_per_trillion_tokens (on 2048 GPUs),
    train_flops_per_token (at 4K), implied_mfu {stage: {bf16, fp8}} for the stages with token counts,
    and fleet.
  """
  cfg = ModelConfig.preset("deepseek-v3") if cfg is None else cfg
  pre = V3_STAGES[0]
  per_t = pre.gpu_hours / (pre.tokens / 1e12)
  mfu = {}
  for s in V3_STAGES:
    if s.phases:
      total = stage_flops(cfg, s, causal=causal)
      mfu[s.name] = {p: implied_mfu_from_flops(total, s.gpu_hours, gpu=V3_GPU, precision=p)
                     for p in ("bf16", "fp8")}
  return dict(
      table1=table1(price_per_gpu_hour=price_per_gpu_hour),
      gpu_hours_per_trillion_tokens=per_t,
      days_per_trillion_tokens=wall_days(per_t, V3_NUM_GPUS),
      train_flops_per_token=flops_lib.train_flops_per_token(cfg, V3_PRETRAIN_SEQ_LEN,
                                                            causal=causal).model,
      implied_mfu=mfu,
      fleet=fleet_view(price_per_gpu_hour=price_per_gpu_hour),
  )


def is_deepseek_v3(cfg: ModelConfig) -> bool:
  """Whether cfg has DeepSeek-V3's architecture (numerics and implementation fields aside)."""
  return cfg.to_hf() == ModelConfig.preset("deepseek-v3").to_hf()


def _count_params(cfg: ModelConfig):
  """count_params(cfg), or (None, reason) where deepseek_jax.analysis.params is unavailable."""
  try:
    from deepseek_jax.analysis.params import count_params  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"parameter counts unavailable: deepseek_jax.analysis.params.count_params ({e})"
  return count_params(cfg), None


def cost_report(cfg: ModelConfig, *, tokens: float = V3_PRETRAIN_TOKENS,
                seq_len: int = V3_PRETRAIN_SEQ_LEN, gpu: str = V3_GPU,
                gpu_hours: Optional[float] = None, mfu: Optional[float] = None,
                precision: str = "bf16", price_per_gpu_hour: float = V3_PRICE_PER_GPU_HOUR,
                num_gpus: int = V3_NUM_GPUS, causal: bool = True, with_params: bool = True) -> dict:
  """Everything the cost CLI prints, as a flat-ish dict.

  GPU-hours come from, in order: `gpu_hours` (then the MFU is implied), `mfu` (then GPU-hours are
  estimated), DeepSeek-V3's reported 2,664K H800 GPU-hours when cfg is the V3 architecture trained on
  the report's 14.8T tokens at 4K on H800, and otherwise DeepSeek-V3's implied pre-training MFU
  (calibrated on the same FLOP convention).

  Args:
    cfg: the model.
    tokens: training tokens.
    seq_len: training sequence length.
    gpu: a key of hardware.GPUS.
    gpu_hours: known GPU-hours of the run.
    mfu: assumed MFU (ignored when gpu_hours is given).
    precision: bf16 | fp8, the peak the MFU refers to.
    price_per_gpu_hour: USD per GPU-hour.
    num_gpus: GPUs, for the wall-clock figure.
    causal: attention FLOP convention (see flops.attended_keys).
    with_params: include count_params (builds the model's shapes; a note replaces it when unavailable).

  Returns:
    dict with params_* (or None), kv_cache_bytes_per_token (MLA, bf16) and the MHA comparison,
    forward_flops_per_token (by component), train_flops_per_token (model FLOPs),
    train_hardware_flops_per_token (with cfg.remat_policy's recomputation), six_n_active_flops_per_token,
    tokens, seq_len, gpu, precision, peak_tflops, gpu_hours, gpu_hours_source, cost_usd, implied_mfu
    (the MFU of the run at `precision`), implied_mfu_bf16 / implied_mfu_fp8, wall_days on num_gpus,
    notes, and for the DeepSeek-V3 architecture table1 and fleet.
  """
  notes = []
  params, why = _count_params(cfg) if with_params else (None, "parameter counts not requested")
  if why:
    notes.append(why)
  fwd = flops_lib.forward_flops_per_token(cfg, seq_len, causal=causal)
  train = flops_lib.train_flops_per_token(cfg, seq_len, causal=causal)
  v3 = is_deepseek_v3(cfg)
  if gpu_hours is not None:
    run = run_from_gpu_hours(tokens, train.model, gpu_hours, gpu=gpu, precision=precision,
                             price_per_gpu_hour=price_per_gpu_hour)
    source = "given"
  elif mfu is not None:
    run = estimate_run(tokens, train.model, mfu=mfu, gpu=gpu, precision=precision,
                       price_per_gpu_hour=price_per_gpu_hour)
    source = "estimated at the given MFU"
  elif (v3 and tokens == V3_PRETRAIN_TOKENS and seq_len == V3_PRETRAIN_SEQ_LEN
        and hardware.get_gpu(gpu).name == V3_GPU):
    run = run_from_gpu_hours(tokens, train.model, V3_STAGES[0].gpu_hours, gpu=gpu,
                             precision=precision, price_per_gpu_hour=price_per_gpu_hour)
    source = "DeepSeek-V3 report, Table 1 (pre-training)"
  else:
    v3_cfg = ModelConfig.preset("deepseek-v3")
    v3_mfu = implied_mfu(V3_PRETRAIN_TOKENS,
                         flops_lib.train_flops_per_token(v3_cfg, V3_PRETRAIN_SEQ_LEN,
                                                         causal=causal).model,
                         V3_STAGES[0].gpu_hours, gpu=V3_GPU, precision=precision)
    run = estimate_run(tokens, train.model, mfu=v3_mfu, gpu=gpu, precision=precision,
                       price_per_gpu_hour=price_per_gpu_hour)
    source = "estimated at DeepSeek-V3's implied pre-training MFU"
  mfus = {p: implied_mfu_from_flops(run.total_flops, run.gpu_hours, gpu=gpu, precision=p)
          for p in ("bf16", "fp8")}
  report = dict(
      params_total=None if params is None else params["total"],
      params_active=None if params is None else params["active"],
      params_mtp=None if params is None else params["mtp"],
      kv_cache_bytes_per_token=flops_lib.kv_cache_bytes_per_token(cfg),
      kv_cache_bytes_per_token_mha=flops_lib.kv_cache_bytes_per_token(cfg, "mha"),
      forward_flops_per_token=fwd.as_dict(),
      train_flops_per_token=train.model,
      train_hardware_flops_per_token=train.hardware,
      remat_policy=cfg.remat_policy,
      six_n_active_flops_per_token=None if params is None else 6 * params["active"],
      attention_convention="causal average ((S+1)/2 keys)" if causal else "full (S keys)",
      tokens=tokens, seq_len=seq_len, total_flops=run.total_flops,
      gpu=run.gpu, precision=precision, peak_tflops=run.peak_flops / hardware.TERA,
      gpu_hours=run.gpu_hours, gpu_hours_source=source,
      price_per_gpu_hour=price_per_gpu_hour, cost_usd=run.cost_usd,
      implied_mfu=run.mfu, implied_mfu_bf16=mfus["bf16"], implied_mfu_fp8=mfus["fp8"],
      num_gpus=num_gpus, wall_days=wall_days(run.gpu_hours, num_gpus),
      notes=notes)
  if v3:
    report["table1"] = table1(price_per_gpu_hour=price_per_gpu_hour)
    report["gpu_hours_per_trillion_tokens"] = V3_STAGES[0].gpu_hours / (V3_STAGES[0].tokens / 1e12)
    report["fleet"] = fleet_view(price_per_gpu_hour=price_per_gpu_hour)
  return report
