"""Compile a jitted function's GPU kernels for Hopper (sm_90a) on a machine without a GPU.

1. the function is lowered for CUDA (`lowering_platforms=('cuda',)`); every Pallas Triton kernel is a
   `__gpu$xla.gpu.triton` custom call whose backend config holds the Triton module as bytecode, every
   Mosaic GPU kernel a `mosaic_gpu_v2` custom call;
2. each distinct Triton module is parsed and verified (`operation.verify()`: jax does not verify it);
3. where the CUDA plugin registers jaxlib's Triton compiler (jax-cuda12-plugin 0.10), the module is
   compiled to PTX for compute capability 9.0 (target sm_90a), which reports its shared memory, and
   `ptxas -arch=sm_90a -v` reports registers and spills;
4. the whole program is compiled by XLA's GPU compiler for an H100 without a GPU (`hopper_device`: a
   compile-only device of the CUDA plugin made from an H100 target description), as it would be on
   the machine: XLA compiles every kernel in it and reports each launch's shared memory.
jaxlib 0.11's CUDA plugin no longer exposes the Triton compiler to Python, so under jax 0.11 step 3 is
skipped and step 4 gives the shared memory. See docs/gpu.md for the environment (`.ci/cuda_env.sh`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Sequence

import jax

SMEM_LIMIT = 232_448          # bytes of shared memory one block may use on H100 / H200
REGISTER_LIMIT = 255          # registers per thread
TRITON_TARGET = "__gpu$xla.gpu.triton"
MOSAIC_TARGET = "mosaic_gpu_v2"


# An H100 SXM as XLA's GPU compiler sees it (xla.GpuTargetConfigProto, text format): the numbers a
# deviceless compile needs (compute capability 9.0, shared memory, registers, SMs).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass
class KernelReport:
  """What the check found for one distinct kernel of a case."""
  name: str
  backend: str                     # 'triton' | 'mosaic_gpu'
  num_warps: int = 0
  num_stages: int = 0
  verified: bool = False
  compiled: bool | None = None     # None: no compiler in this environment
  smem_bytes: int | None = None
  registers: int | None = None
  spill_bytes: int | None = None   # spill stores + spill loads
  xla_smem_bytes: int | None = None  # shared memory of its launch in XLA's whole-program compile
  error: str = ""

  @property
  def ok(self) -> bool:
    """Verifies, compiles where a compiler exists, fits Hopper's shared memory and registers."""
    if not self.verified or self.compiled is False or self.error:
      return False
    for smem in (self.smem_bytes, self.xla_smem_bytes):
      if smem is not None and smem > SMEM_LIMIT:
        return False
    return self.registers is None or self.registers <= REGISTER_LIMIT


def cuda_plugin_available() -> tuple[bool, str]:
  """(whether a jax CUDA plugin is importable here, why not)."""
  try:
    from jax_plugins import xla_cuda12  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True, ""
  except ImportError:
    pass
  try:
    from jax_plugins import xla_cuda13  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True, ""
  except ImportError:
    return False, ("no jax CUDA plugin is importable (jax-cuda12-plugin / jax-cuda13-plugin); "
                   "run `.ci/cuda_env.sh` and use its environment")


def triton_compiler():
  """jaxlib's Triton-to-PTX compiler as `f(module_bytes, num_warps, num_stages) -> (ptx, smem)`, or None."""
  from jax._src.lib import triton  # pylint: disable=g-import-not-at-top
  if not hasattr(triton, "compile"):
    return None
  jax.devices()   # initializes the plugins, which register their compilation handlers
  if not triton.has_compilation_handler("cuda"):
    return None

  def compile_(module: bytes, num_warps: int, num_stages: int):
    res = triton.compile("cuda", module, "9.0", num_warps=num_warps, num_ctas=1,
                         num_stages=num_stages)
    return res.asm, int(res.smem_bytes)
  return compile_


def find_ptxas() -> str | None:
  """A ptxas: $PTXAS, the nvidia-cuda-nvcc wheel's, then PATH."""
  if os.environ.get("PTXAS"):
    return os.environ["PTXAS"]
  try:
    import nvidia  # pylint: disable=g-import-not-at-top
    for root in nvidia.__path__:
      for sub in ("cu13/bin/ptxas", "cuda_nvcc/bin/ptxas"):
        path = os.path.join(root, sub)
        if os.path.exists(path):
          return path
  except ImportError:
    pass
  return shutil.which("ptxas")


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_report(ptx: str, ptxas: str) -> dict:
  """Registers and spill bytes of the PTX's kernel from `ptxas -arch=sm_90a -v`."""
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                          capture_output=True, text=True, check=False)
  text = proc.stdout + proc.stderr
  if proc.returncode:
    raise RuntimeError(f"ptxas failed: {text.strip()[-400:]}")
  vals = {k: [int(x) for x in r.findall(text)] for k, r in _PTXAS_RE.items()}
  return {"registers": max(vals["registers"], default=0),
          "spill_bytes": sum(vals["spill_stores"]) + sum(vals["spill_loads"])}


@contextlib.contextmanager
def hopper_target():
  """Lowers Pallas Triton kernels for an H100 where no GPU is attached (jax 0.11 asks the device)."""
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  saved = gpu_info.get_gpu_info
  gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  try:
    yield
  finally:
    gpu_info.get_gpu_info = saved


def lower_for_cuda(fn: Callable, *args: Any, **kwargs: Any):
  """`jax.jit(fn)` traced on abstract args and lowered for CUDA; returns the stablehlo module."""
  with hopper_target():
    lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
  return lowered.compiler_ir("stablehlo")


@dataclasses.dataclass
class _Kernel:
  name: str
  backend: str
  module: bytes
  num_warps: int = 0
  num_stages: int = 0


def extract_kernels(module) -> list[_Kernel]:
  """The distinct Triton and Mosaic GPU kernels embedded in a lowered stablehlo module."""
  found, seen = [], set()

  def visit(op):
    op = op.operation if hasattr(op, "operation") else op
    if op.name == "stablehlo.custom_call":
      target = op.attributes["call_target_name"].value
      if target in (TRITON_TARGET, MOSAIC_TARGET):
        cfg = op.attributes["mhlo.backend_config"]
        body = cfg["ir" if target == TRITON_TARGET else "module"].value_bytes
        if target == TRITON_TARGET:
          k = _Kernel(cfg["name"].value, "triton", body, int(cfg["num_warps"].value),
                      int(cfg["num_stages"].value))
        else:
          k = _Kernel("mosaic_gpu", "mosaic_gpu", body)
        key = hashlib.sha256(body + bytes([k.num_warps, k.num_stages])).hexdigest()
        if key not in seen:
          seen.add(key)
          found.append(k)
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          visit(child)

  visit(module.operation)
  return found


def verify_triton(module: bytes) -> None:
  """Parses a Triton module's bytecode and runs the MLIR verifier; raises on failure."""
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.triton import dialect as tt_dialect  # pylint: disable=g-import-not-at-top
  ctx = mlir.JaxIrContext()
  ctx.append_dialect_registry(mlir.upstream_dialects)
  tt_dialect.register_dialect(ctx)
  ctx.load_all_available_dialects()
  with ctx:
    parsed = ir.Module.parse(module)
    parsed.operation.verify()


def check_kernels(kernels: Sequence[_Kernel], compiler=None, ptxas: str | None = None
                  ) -> list[KernelReport]:
  """Verifies each kernel, compiles Triton ones to PTX for sm_90a and runs ptxas where available."""
  reports = []
  for k in kernels:
    rep = KernelReport(k.name, k.backend, k.num_warps, k.num_stages)
    reports.append(rep)
    if k.backend != "triton":
      rep.verified = True       # jax's Mosaic GPU lowering verifies its module before serializing
      continue
    try:
      verify_triton(k.module)
      rep.verified = True
    except Exception as e:  # pylint: disable=broad-except
      rep.error = "verify: " + _one_line(e)
      continue
    if compiler is None:
      continue
    try:
      ptx, rep.smem_bytes = compiler(k.module, k.num_warps, k.num_stages)
      rep.compiled = True
    except Exception as e:  # pylint: disable=broad-except
      rep.compiled = False
      rep.error = "compile: " + _one_line(e)
      continue
    if ptxas:
      try:
        r = ptxas_report(ptx, ptxas)
        rep.registers, rep.spill_bytes = r["registers"], r["spill_bytes"]
      except Exception as e:  # pylint: disable=broad-except
        rep.error = _one_line(e)
  return reports


def check(fn: Callable, *args: Any, compiler=None, ptxas: str | None = None, **kwargs: Any
          ) -> list[KernelReport]:
  """Lowers `fn(*args)` for CUDA and checks every kernel in it (see module docstring)."""
  return check_kernels(extract_kernels(lower_for_cuda(fn, *args, **kwargs)), compiler, ptxas)


_DEVICES: dict[int, list] = {}


def h100_devices(count: int = 1) -> list:
  """`count` compile-only H100 devices of the CUDA plugin (no GPU needed), 8 per simulated node: a mesh
  over them compiles with XLA's GPU compiler as it would on `count` GPUs."""
  if count not in _DEVICES:
    from jax._src import xla_bridge as xb  # pylint: disable=g-import-not-at-top
    jax.devices()
    per_node = min(count, 8)
    if count % per_node:
      raise ValueError(f"h100_devices: {count} devices are not whole nodes of 8")
    topology = xb.make_pjrt_topology("cuda", "", topology=f"1x{count // per_node}x{per_node}",
                                     target_config=H100_TARGET_CONFIG)
    _DEVICES[count] = list(topology._make_compile_only_devices())  # pylint: disable=protected-access
  return _DEVICES[count]


def hopper_device():
  """A compile-only H100 device of the CUDA plugin (no GPU needed), for `xla_compile`."""
  return h100_devices(1)[0]


_THUNK_RE = re.compile(r"kCustomKernel .*?\] (\S+) grid: .* shared_memory: (\d+) bytes")


def xla_compile(fn: Callable, *args: Any) -> dict[str, int]:
  """Compiles `fn(*args)` (abstract args) with XLA for an H100; returns {kernel name: most shared
  memory of its launches}. Raises what XLA raises (an invalid kernel, shared memory over the limit)."""
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  sharding = SingleDeviceSharding(hopper_device())
  placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  with hopper_target():
    lowered = jax.jit(fn).trace(*placed).lower()
  with tempfile.TemporaryDirectory() as d:
    lowered.compile(compiler_options={"xla_dump_to": d, "xla_dump_hlo_as_text": True})
    smem: dict[str, int] = {}
    for name in os.listdir(d):
      if name.endswith("thunk_sequence.txt"):
        with open(os.path.join(d, name)) as f:
          for kernel, size in _THUNK_RE.findall(f.read()):
            smem[kernel] = max(smem.get(kernel, 0), int(size))
  return smem


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  for marker in ("error:", "failed to verify"):
    i = text.find(marker)
    if i > 0:
      text = text[max(0, i - 60):]
      break
  return text[:300]
