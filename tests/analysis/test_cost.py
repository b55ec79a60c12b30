"""GPU-hours, dollars and implied MFU: DeepSeek-V3's Table 1, its implied MFU, the hardware table, the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from deepseek_jax.analysis import cost
from deepseek_jax.analysis import flops as F
from deepseek_jax.analysis import hardware
from deepseek_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V3 = ModelConfig.preset("deepseek-v3")


def test_table1_reproduced_exactly():
  rows = {r["stage"]: r for r in cost.table1()}
  want = {"pre-training": (2_664_000, 5_328_000), "context extension": (119_000, 238_000),
          "post-training": (5_000, 10_000), "total": (2_788_000, 5_576_000)}
  assert list(rows) == list(want)
  for stage, (hours, usd) in want.items():
    assert rows[stage]["gpu_hours"] == hours
    assert rows[stage]["cost_usd"] == pytest.approx(usd, abs=1e-6)


def test_per_trillion_tokens_and_days():
  report = cost.deepseek_v3_report()
  assert report["gpu_hours_per_trillion_tokens"] == pytest.approx(180_000)
  assert round(report["days_per_trillion_tokens"], 1) == 3.7
  assert cost.wall_days(180_000, 2048) == pytest.approx(180_000 / 2048 / 24)


def test_v3_implied_mfu():
  """tokens x FLOPs/token / (GPU-hours x 3600 x peak), by hand, and a plausible value (about 41% of the
  H800 dense BF16 peak with causal-average attention, 20% of the FP8 peak)."""
  train = F.train_flops_per_token(V3, 4096).model
  mfu = cost.implied_mfu(14.8e12, train, 2664e3, gpu="H800")
  assert mfu == pytest.approx(14.8e12 * train / (2664e3 * 3600 * 989.4e12), rel=1e-12)
  assert 0.35 < mfu < 0.45
  assert cost.implied_mfu(14.8e12, train, 2664e3, gpu="H800", precision="fp8") == pytest.approx(mfu / 2,
                                                                                                rel=1e-3)
  # Counting all S keys instead of the causal average raises the FLOPs, hence the implied MFU.
  full = F.train_flops_per_token(V3, 4096, causal=False).model
  assert cost.implied_mfu(14.8e12, full, 2664e3) > mfu
  report = cost.deepseek_v3_report()
  assert report["implied_mfu"]["pre-training"]["bf16"] == pytest.approx(mfu)
  # Context extension (section 4.3 step counts): 32K and 128K attention at a lower implied MFU.
  ext = report["implied_mfu"]["context extension"]["bf16"]
  assert 0.1 < ext < mfu


def test_estimate_and_implied_mfu_are_inverse():
  train = F.train_flops_per_token(V3, 4096).model
  mfu = cost.implied_mfu(14.8e12, train, 2664e3)
  run = cost.estimate_run(14.8e12, train, mfu=mfu, gpu="H800", price_per_gpu_hour=2.0)
  assert run.gpu_hours == pytest.approx(2664e3)
  assert run.cost_usd == pytest.approx(5.328e6)
  assert run.total_flops == 14.8e12 * train
  back = cost.run_from_gpu_hours(14.8e12, train, run.gpu_hours)
  assert back.mfu == pytest.approx(mfu)
  assert run.wall_days(2048) == pytest.approx(2664e3 / 2048 / 24)
  with pytest.raises(ValueError, match="mfu"):
    cost.estimate_run(1e9, 1e9, mfu=1.5)
  with pytest.raises(ValueError, match="gpu_hours"):
    cost.implied_mfu(1e9, 1e9, 0)


def test_hardware_table():
  h800, h100, h200, b200 = (hardware.get_gpu(n) for n in ("H800", "h100", "H200 SXM", "B200"))
  assert (h800.bf16_tflops, h800.fp8_tflops, h800.hbm_gb, h800.hbm_tb_s) == \
      (h100.bf16_tflops, h100.fp8_tflops, h100.hbm_gb, h100.hbm_tb_s)
  assert h800.nvlink_gb_s < h100.nvlink_gb_s and "H100" in h800.source
  assert h200.hbm_gb > h100.hbm_gb and h200.bf16_tflops == h100.bf16_tflops
  for g in (h800, h100, h200, b200):
    assert g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=1e-3)
    assert g.peak_flops("bf16") == g.bf16_tflops * 1e12 and "datasheet" in g.source
  assert b200.bf16_tflops > h100.bf16_tflops
  with pytest.raises(ValueError, match="gpu"):
    hardware.get_gpu("A100")
  with pytest.raises(ValueError, match="precision"):
    h100.peak_flops("fp16")


def test_gpu_for_device_reads_jax_device_kinds():
  assert hardware.gpu_for_device("NVIDIA H200") is hardware.get_gpu("H200")
  assert hardware.gpu_for_device("NVIDIA H100 80GB HBM3") is hardware.get_gpu("H100")
  assert hardware.gpu_for_device("NVIDIA B200") is hardware.get_gpu("B200")
  assert hardware.gpu_for_device("NVIDIA A100-SXM4-80GB") is None
  assert hardware.gpu_for_device("cpu") is None


def test_fleet_view_keeps_press_estimates_apart():
  fleet = cost.fleet_view()
  assert fleet["run"]["cost_usd"] == pytest.approx(5.576e6)
  assert fleet["run"]["gpus"] == 2048
  assert "press" in fleet["press_estimates"]["note"]
  assert fleet["press_estimates"]["fleet_gpus"] == 50_000
  assert fleet["derived"]["server_capex_per_gpu_usd"] == pytest.approx(32_000)
  assert fleet["derived"]["run_cluster_capex_usd"] == pytest.approx(2048 * 32_000)
  assert fleet["derived"]["run_cost_over_fleet_capex"] == pytest.approx(5.576e6 / 1.6e9)


def test_cost_report_sources():
  r = cost.cost_report(V3, with_params=False)
  assert r["gpu_hours"] == 2664e3 and r["cost_usd"] == pytest.approx(5.328e6)
  assert "Table 1" in r["gpu_hours_source"] and r["table1"][-1]["cost_usd"] == pytest.approx(5.576e6)
  assert r["params_total"] is None and "not requested" in r["notes"][0]
  v3_mfu = r["implied_mfu"]
  small = ModelConfig.preset("small")
  s = cost.cost_report(small, tokens=1e9, seq_len=2048, with_params=False)
  assert "implied pre-training MFU" in s["gpu_hours_source"] and "table1" not in s
  assert s["implied_mfu"] == pytest.approx(v3_mfu)
  assert s["gpu_hours"] == pytest.approx(
      1e9 * F.train_flops_per_token(small, 2048).model / (989.4e12 * v3_mfu * 3600))
  g = cost.cost_report(small, tokens=1e9, seq_len=2048, gpu="B200", gpu_hours=10.0, with_params=False)
  assert g["implied_mfu"] == pytest.approx(
      1e9 * F.train_flops_per_token(small, 2048).model / (10 * 3600 * 2250e12))
  m = cost.cost_report(small, tokens=1e9, seq_len=2048, mfu=0.5, price_per_gpu_hour=3.0,
                       with_params=False)
  assert m["cost_usd"] == pytest.approx(3.0 * m["gpu_hours"]) and m["implied_mfu"] == 0.5


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.costs", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_cli_json_v3():
  r = json.loads(_cli("--preset=deepseek-v3", "--format=json"))
  assert r["params_total"] == 671_026_419_200
  assert r["params_active"] == 37_552_297_472
  assert r["kv_cache_bytes_per_token"] == 70_272
  assert r["train_flops_per_token"] == pytest.approx(F.train_flops_per_token(V3, 4096).model)
  assert r["gpu_hours"] == 2664e3 and r["cost_usd"] == pytest.approx(5.328e6)
  assert 0.35 < r["implied_mfu"] < 0.45
  assert r["six_n_active_flops_per_token"] == 6 * 37_552_297_472
  assert [row["gpu_hours"] for row in r["table1"]] == [2664e3, 119e3, 5e3, 2788e3]


def test_cli_table_v3():
  out = _cli("--preset=deepseek-v3")
  assert "70,272 B" in out and "$5.576M" in out and "40.7% / 20.3%" in out
  assert "180K GPU-hours per trillion tokens = 3.7 days on 2,048 GPUs" in out
  assert "press estimates" in out


def test_cli_experiment_config(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent("""
      import ml_collections

      def get_config():
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict(dict(preset="tiny", num_hidden_layers=2))
        c.steps, c.batch_size, c.seq_len = 100, 8, 128
        return c
      """))
  r = json.loads(_cli(f"--config={path}", "--format=json", "--gpu=H200", "--mfu=0.3",
                      "--price_per_gpu_hour=4"))
  cfg = ModelConfig.preset("tiny", num_hidden_layers=2)
  assert r["tokens"] == 100 * 8 * 128 and r["seq_len"] == 128
  assert r["train_flops_per_token"] == pytest.approx(F.train_flops_per_token(cfg, 128).model)
  assert r["gpu_hours"] == pytest.approx(100 * 8 * 128 * r["train_flops_per_token"]
                                         / (989.4e12 * 0.3 * 3600))
  assert r["cost_usd"] == pytest.approx(4 * r["gpu_hours"])
  assert "table1" not in r


def test_experiment_model_config_names_bad_fields():
  sys.path.insert(0, ROOT)
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top
    from experiments.costs import model_config_from_experiment  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(ROOT)
  ok = ml_collections.ConfigDict(dict(model=dict(preset="tiny", q_lora_rank=16)))
  assert model_config_from_experiment(ok) == ModelConfig.preset("tiny", q_lora_rank=16)
  with pytest.raises(ValueError, match="model.hiden_size"):
    model_config_from_experiment(ml_collections.ConfigDict(dict(model=dict(preset="tiny",
                                                                          hiden_size=3))))
  with pytest.raises(ValueError, match="model.preset"):
    model_config_from_experiment(ml_collections.ConfigDict(dict(model=dict(hidden_size=3))))
