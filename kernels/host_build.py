"""Builds and loads the host (CPU) FFI kernels: `host_moe`, `host_attention` and `host_matmul`.

Their C++ sources (`host_blas.cc`, `host_moe.cc`, `host_attention.cc`, `host_matmul.cc`, with
`host_blas.h`) are compiled on first use, with the system C++ compiler against the FFI headers that jaxlib
ships, into one shared library in a cache directory (`DEEPSEEK_JAX_CACHE`, default
`~/.cache/deepseek_jax`), keyed by the sources, jaxlib's version, the compiler and its flags, and installed
by an atomic rename (concurrent builders, such as test workers, are safe). The kernels call `sgemm`
single-threaded from XLA's intra-op threads: on Intel CPUs MKL's, linked in statically where its static
libraries are installed (`pip install -e '.[cpu]'`, the `mkl-static` wheel; its symbols stay local to the
library, so a PyTorch in the same process keeps its own MKL), else that of numpy's bundled ILP64 OpenBLAS,
loaded at run time (on an AMD EPYC MKL ran slower than OpenBLAS); `DEEPSEEK_JAX_HOST_BLAS=mkl` or
`=openblas` forces the choice. `blas()` says which. The FFI targets are registered for the CPU platform.
Nothing is built or loaded until a host kernel is chosen (`ModelConfig.*_impl='host'`, checked by
`deepseek_jax.ops.impls`); without a compiler or a BLAS, `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import numpy as np

_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("host_blas.cc", "host_moe.cc", "host_attention.cc", "host_matmul.cc")
_HEADERS = ("host_blas.h",)
# The FFI handlers the library exports, registered under their own names.
TARGETS = ("dsj_host_moe_ffn_fwd", "dsj_host_moe_ffn_bwd", "dsj_host_attention_fwd",
           "dsj_host_attention_bwd", "dsj_host_matmul")
# (library glob under numpy's wheel, sgemm symbol, thread-local thread-count setter): ILP64 OpenBLAS builds.
_BLAS_CANDIDATES = (
    ("numpy.libs/libscipy_openblas64_*.so*", "scipy_cblas_sgemm64_", "openblas_set_num_threads_local"),
    ("numpy/.dylibs/libscipy_openblas64_*.dylib", "scipy_cblas_sgemm64_", "openblas_set_num_threads_local"),
    ("numpy.libs/libopenblas64_*.so*", "cblas_sgemm64_", "openblas_set_num_threads_local"),
)
_FLAGS = ("-O3", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-w")
# MKL's static libraries (the `mkl-static` wheel installs them into the environment's lib/): linked in where
# present on an Intel CPU, with their symbols kept local to the kernels' library.
_MKL_STATIC = ("libmkl_intel_ilp64.a", "libmkl_sequential.a", "libmkl_core.a")
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> str:
  return os.environ.get("DEEPSEEK_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "deepseek_jax")


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_vendor() -> str:
  """The CPU's vendor string ('GenuineIntel', 'AuthenticAMD', ...) from /proc/cpuinfo, '' if unknown."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("vendor_id"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _wants_mkl() -> bool:
  """Whether to link MKL: `DEEPSEEK_JAX_HOST_BLAS` = 'mkl' / 'openblas' decides, else only on Intel CPUs
  (on AMD CPUs OpenBLAS ran the kernels faster; docs/performance.md)."""
  choice = os.environ.get("DEEPSEEK_JAX_HOST_BLAS", "").lower()
  if choice in ("mkl", "openblas"):
    return choice == "mkl"
  return _cpu_vendor() == "GenuineIntel"


def _static_mkl() -> list[str] | None:
  """The link arguments of MKL's static libraries where they are installed and wanted (`_wants_mkl`), else
  None."""
  if not _wants_mkl() or sys.platform != "linux":
    return None
  libs = [os.path.join(sys.prefix, "lib", name) for name in _MKL_STATIC]
  if not all(os.path.exists(lib) for lib in libs):
    return None
  return ["-Wl,--start-group", *libs, "-Wl,--end-group", "-Wl,--exclude-libs,ALL", "-lpthread", "-lm"]


def _build(compiler: str) -> str:
  """Compiles the sources (once per sources / jaxlib / compiler / flags); returns the library's path."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  mkl = _static_mkl()
  flags = [*_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_DIR}", *(["-DDSJ_STATIC_MKL"] if mkl else [])]
  link = [*(mkl or []), "-ldl"]
  parts = [jaxlib.__version__.encode(), compiler.encode(), *(f.encode() for f in flags + link)]
  for name in _SOURCES + _HEADERS:
    with open(os.path.join(_DIR, name), "rb") as f:
      parts += [name.encode(), f.read()]
  key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  out_dir = _cache_dir()
  path = os.path.join(out_dir, f"host_kernels-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, *flags, *(os.path.join(_DIR, s) for s in _SOURCES), "-o", tmp, *link]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    os.replace(tmp, path)   # atomic: concurrent builders each install a complete file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _find_blas():
  """(library path, sgemm symbol, thread setter) of numpy's bundled ILP64 OpenBLAS, or None."""
  site = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
  for pattern, sgemm, threads in _BLAS_CANDIDATES:
    for lib in sorted(glob.glob(os.path.join(site, pattern))):
      return lib, sgemm, threads
  return None


def _load() -> str | None:
  """Builds, loads and registers the kernels; returns None on success, else why they are unavailable."""
  if sys.platform not in ("linux", "darwin"):
    return f"unsupported platform {sys.platform}"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler (set CXX or install g++)"
  try:
    lib = ctypes.cdll.LoadLibrary(_build(compiler))
  except (OSError, subprocess.SubprocessError) as err:
    detail = getattr(err, "stderr", "") or str(err)
    return f"building the host kernels failed: {detail.strip()[-500:]}"
  if lib.dsj_host_static_blas():
    blas = ("MKL (static)", "cblas_sgemm", "MKL_Set_Num_Threads_Local")
  else:
    blas = _find_blas()
    if blas is None:
      return "numpy bundles no ILP64 OpenBLAS here"
  path, sgemm, threads = blas
  rc = lib.dsj_host_init(path.encode(), sgemm.encode(), threads.encode())
  if rc != 0:
    return f"loading {sgemm} / {threads} from {path} failed ({rc})"
  for target in TARGETS:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
  _state["lib"] = lib
  _state["blas"] = path
  return None


def blas() -> str | None:
  """The BLAS the host kernels call: 'MKL (static)' or the path of numpy's OpenBLAS; None if unavailable."""
  return _state.get("blas") if unavailable_reason() is None else None


def unavailable_reason() -> str | None:
  """None when the kernels are built and registered (building them on the first call), else the reason."""
  with _lock:
    if "reason" not in _state:
      _state["reason"] = _load()
    return _state["reason"]


def available() -> bool:
  """Whether the host kernels can run here (a CPU backend, a C++ compiler, MKL or numpy's ILP64 OpenBLAS)."""
  if jax.default_backend() != "cpu":
    return False
  return unavailable_reason() is None


def require(what: str) -> None:
  """Raises RuntimeError naming `what` when the kernels are unavailable."""
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"{what} is unavailable: {reason}")
