"""Accelerator figures for cost estimates: dense peak matmul throughput, HBM, interconnect.

Every figure is the vendor's published peak per GPU, dense (NVIDIA datasheets print Tensor Core
throughput "with sparsity"; the dense figure is half of it).  Peaks are what MFU is measured against, not
what a kernel reaches: docs/reference.md lists measured figures (DeepGEMM FP8 up to 1550 TFLOP/s on H800,
about 790 TFLOP/s bf16 matmul on H200).
"""

from __future__ import annotations

import dataclasses

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class GPU:
  """One accelerator model.

  Attributes:
    name: short name used as the table key.
    bf16_tflops: dense BF16 Tensor Core peak, TFLOP/s.
    fp8_tflops: dense FP8 Tensor Core peak, TFLOP/s.
    hbm_gb: HBM capacity, GB (10^9 bytes, as vendors print it).
    hbm_tb_s: HBM bandwidth, TB/s.
    nvlink_gb_s: NVLink bandwidth per GPU, GB/s, total of both directions.
    source: where the figures come from.
    ib_gb_s: InfiniBand bandwidth per GPU and direction, GB/s (one 400 Gb/s ConnectX-7 NIC per GPU in the
      vendors' reference nodes: 50 GB/s; the DeepSeek-V3 report, section 3.2.2, counts 50 GB/s too).
  """
  name: str
  bf16_tflops: float
  fp8_tflops: float
  hbm_gb: float
  hbm_tb_s: float
  nvlink_gb_s: float
  source: str
  ib_gb_s: float = 50.0

  def peak_flops(self, precision: str = "bf16") -> float:
    """Dense peak in FLOP/s for `precision` ("bf16" or "fp8")."""
    if precision == "bf16":
      return self.bf16_tflops * TERA
    if precision == "fp8":
      return self.fp8_tflops * TERA
    raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp8'")


GPUS: dict[str, GPU] = {
    "H800": GPU(
        name="H800", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gb=80, hbm_tb_s=3.35, nvlink_gb_s=400,
        source=("NVIDIA H800 Tensor Core GPU datasheet (SXM5): the H100 SXM compute and memory with "
                "NVLink reduced to 400 GB/s (H100: 900 GB/s); the DeepSeek-V3 report (section 3.1) "
                "quotes about 160 GB/s achievable NVLink per direction")),
    "H100": GPU(
        name="H100", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gb=80, hbm_tb_s=3.35, nvlink_gb_s=900,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 (sparsity figures 1979 / 3958 halved)"),
    "H200": GPU(
        name="H200", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gb=141, hbm_tb_s=4.8, nvlink_gb_s=900,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM (sparsity figures 1979 / 3958 halved)"),
    "B200": GPU(
        name="B200", bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_gb=180, hbm_tb_s=8.0, nvlink_gb_s=1800,
        source=("NVIDIA HGX B200 datasheet, per GPU (8-GPU figures 36 / 72 PFLOP/s sparse BF16 / FP8, "
                "1.44 TB HBM3e, 64 TB/s, divided by 8 and halved for dense); NVLink 5 1.8 TB/s")),
}
# The training GPU of DeepSeek-V3 and its aliases.
GPUS["H100 SXM"] = GPUS["H100"]
GPUS["H200 SXM"] = GPUS["H200"]
GPUS["H800 SXM"] = GPUS["H800"]


def get_gpu(name: str) -> GPU:
  """The `GPU` called `name` (case-insensitive; H800, H100, H200, B200, and "<name> SXM").

  Args:
    name: a key of GPUS.

  Returns:
    The GPU record.
  """
  for key, gpu in GPUS.items():
    if key.lower() == name.strip().lower():
      return gpu
  raise ValueError(f"gpu={name!r} is unknown; known: {sorted(k for k in GPUS if ' ' not in k)}")


def gpu_for_device(device_kind: str):
  """The `GPU` record of a jax device kind string (e.g. "NVIDIA H200"), or None when none matches.

  Args:
    device_kind: `jax.Device.device_kind`.
  """
  words = device_kind.upper().replace("-", " ").split()
  for key in sorted((k for k in GPUS if " " not in k), key=len, reverse=True):
    if key.upper() in words:
      return GPUS[key]
  return None
