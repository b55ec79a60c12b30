"""The routed experts' SwiGLU FFN on the CPU as an XLA FFI custom call over the host's BLAS.

XLA:CPU runs the many small per-expert products of a dropless MoE layer at about half the rate of one flat
matmul, whether as batched matmuls over padded blocks or as `ragged_dot`. Here the same work goes to
single-threaded BLAS `sgemm` calls (numpy's bundled OpenBLAS), one per (expert, tile of at most `TILE`
rows), spread over XLA's intra-op thread pool:

  1. the T*K (token, slot) assignments are sorted by expert in the kernel (a stable counting sort);
  2. forward, per tile: gather the tile's token rows, gu = [x Wg | x Wu], h = silu(g) * u, y = h Wd, and
     write y to the rows' flat assignment positions (no padding rows, no weight gathers, no XLA gathers);
     gu is kept for the backward;
  3. backward, per tile: dh = dy Wd^T, d[gu] from the SwiGLU derivative, dx = dg Wg^T + du Wu^T; then per
     expert dWg, dWu, dWd over all its rows.

The C++ source (`host_moe.cc`) is compiled on first use with the system C++ compiler against the FFI
headers that jaxlib ships, into a cache directory (`DEEPSEEK_JAX_CACHE`, default
`~/.cache/deepseek_jax`), keyed by the source, jaxlib's version, the compiler and its flags.
`available()` says whether that worked; without a compiler or an ILP64 OpenBLAS the callers keep XLA's own
layouts. float32 only; one device (the custom call is opaque to the SPMD partitioner).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np


# Rows per tile: tiles of one expert are independent tasks; 256 keeps 2 threads busy at E16 x 512 rows.
TILE = 256

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_moe.cc")
_FWD, _BWD = "dsj_host_moe_ffn_fwd", "dsj_host_moe_ffn_bwd"
# (library glob under numpy's wheel, sgemm symbol, thread-local thread-count setter): ILP64 OpenBLAS builds.
_BLAS_CANDIDATES = (
    ("numpy.libs/libscipy_openblas64_*.so*", "scipy_cblas_sgemm64_", "openblas_set_num_threads_local"),
    ("numpy/.dylibs/libscipy_openblas64_*.dylib", "scipy_cblas_sgemm64_", "openblas_set_num_threads_local"),
    ("numpy.libs/libopenblas64_*.so*", "cblas_sgemm64_", "openblas_set_num_threads_local"),
)
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> str:
  return os.environ.get("DEEPSEEK_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "deepseek_jax")


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(compiler: str) -> str:
  """Compiles host_moe.cc (once per source / jaxlib / compiler) and returns the shared library's path."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  with open(_SOURCE, "rb") as f:
    source = f.read()
  out_dir = _cache_dir()
  flags = ["-O3", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), compiler.encode()]
                                   + [f.encode() for f in flags])).hexdigest()[:16]
  path = os.path.join(out_dir, f"host_moe-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, *flags, _SOURCE, "-o", tmp, "-ldl"]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    os.replace(tmp, path)   # atomic: concurrent builders (test workers) each install a complete file
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
  """Builds, loads and registers the kernel; returns None on success, else why it is unavailable."""
  if sys.platform not in ("linux", "darwin"):
    return f"unsupported platform {sys.platform}"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler (set CXX or install g++)"
  blas = _find_blas()
  if blas is None:
    return "numpy bundles no ILP64 OpenBLAS here"
  try:
    lib = ctypes.cdll.LoadLibrary(_build(compiler))
  except (OSError, subprocess.SubprocessError) as err:
    detail = getattr(err, "stderr", "") or str(err)
    return f"building {os.path.basename(_SOURCE)} failed: {detail.strip()[-500:]}"
  path, sgemm, threads = blas
  rc = lib.dsj_host_moe_init(path.encode(), sgemm.encode(), threads.encode())
  if rc != 0:
    return f"loading {sgemm} / {threads} from {path} failed ({rc})"
  jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.dsj_host_moe_ffn_fwd), platform="cpu")
  jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.dsj_host_moe_ffn_bwd), platform="cpu")
  _state["lib"] = lib
  return None


def unavailable_reason() -> str | None:
  """None when the kernel is built and registered (building it on the first call), else the reason."""
  with _lock:
    if "reason" not in _state:
      _state["reason"] = _load()
    return _state["reason"]


def available() -> bool:
  """Whether `host_experts` can run here (a CPU backend, a C++ compiler, numpy's ILP64 OpenBLAS)."""
  if jax.default_backend() != "cpu":
    return False
  return unavailable_reason() is None


def _require():
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"kernels.host_moe is unavailable: {reason}")


def _forward_call(x, idx, w_gate, w_up, w_down, tile):
  """(y [T*K, D] in flat assignment order, gu [T*K, 2F] in sorted order)."""
  rows, k, f = idx.size, idx.shape[1], w_gate.shape[2]
  out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in ((rows, x.shape[1]), (rows, 2 * f)))
  return jax.ffi.ffi_call(_FWD, out)(x, idx, w_gate, w_up, w_down, k=np.int64(k), tile=np.int64(tile))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ffn(x, idx, w_gate, w_up, w_down, tile):
  """[T*K, D]: each flat (token, slot) assignment through its expert (0 for ids outside [0, E))."""
  return _forward_call(x, idx, w_gate, w_up, w_down, tile)[0]


def _ffn_fwd(x, idx, w_gate, w_up, w_down, tile):
  y, gu = _forward_call(x, idx, w_gate, w_up, w_down, tile)
  return y, (x, idx, w_gate, w_up, w_down, gu)


def _ffn_bwd(tile, res, dy):
  x, idx, w_gate, w_up, w_down, gu = res
  (t, k), d = idx.shape, x.shape[1]
  out = tuple(jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in (dy, w_gate, w_up, w_down))
  dx, dwg, dwu, dwd = jax.ffi.ffi_call(_BWD, out)(x, idx, w_gate, w_up, w_down, gu, dy, k=np.int64(k),
                                                  tile=np.int64(tile))
  return dx.reshape(t, k, d).sum(1), None, dwg, dwu, dwd


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def host_experts(x, idx, weights, w_gate, w_up, w_down, *, tile: int = TILE):
  """sum_k weights[t,k] * expert_{idx[t,k]}(x[t]) with the SwiGLU experts of stacked float32 weights.

  Args:
    x: [T, D] float32 tokens.
    idx, weights: [T, K] expert ids and gate weights (ids outside [0, E) contribute 0).
    w_gate, w_up: [E, D, F]; w_down: [E, F, D], float32.
    tile: rows per task (at most; each tile holds rows of one expert).
  Returns:
    [T, D] float32.
  Raises:
    RuntimeError: the kernel is unavailable here (`unavailable_reason()`).
    ValueError: a dtype other than float32, or mismatched shapes.
  """
  _require()
  for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    if a.dtype != jnp.float32:
      raise ValueError(f"host_experts: {name} must be float32, got {a.dtype}")
  e, d, f = w_gate.shape
  if (x.ndim != 2 or idx.ndim != 2 or idx.shape != weights.shape or idx.shape[0] != x.shape[0]
      or x.shape[1] != d or w_up.shape != (e, d, f) or w_down.shape != (e, f, d)):
    raise ValueError(f"host_experts: x {x.shape}, idx {idx.shape}, weights {weights.shape}, w_gate "
                     f"{w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} do not match")
  if int(tile) < 1:
    raise ValueError(f"host_experts: tile must be >= 1, got {tile}")
  t, k = idx.shape
  y = _ffn(x, jax.lax.stop_gradient(idx).astype(jnp.int32), w_gate, w_up, w_down, int(tile)).reshape(t, k, d)
  return jnp.einsum("TKD,TK->TD", y, weights.astype(y.dtype))


def reference(x, idx, weights, w_gate, w_up, w_down):
  """Pure-jnp reference: every assignment through its expert, weighted sum over K."""
  e = w_gate.shape[0]
  valid = (idx >= 0) & (idx < e)
  safe = jnp.where(valid, idx, 0)
  g = jnp.einsum("TD,TKDF->TKF", x, w_gate[safe])
  u = jnp.einsum("TD,TKDF->TKF", x, w_up[safe])
  y = jnp.einsum("TKF,TKFD->TKD", jax.nn.silu(g) * u, w_down[safe])
  return jnp.einsum("TKD,TK->TD", y, jnp.where(valid, weights, 0).astype(y.dtype))


def warn_if_unavailable() -> None:
  """Warns once, with the reason, when the kernel cannot be used (the CPU default then falls back)."""
  reason = unavailable_reason()
  if reason is not None and not _state.get("warned"):
    _state["warned"] = True
    warnings.warn(f"kernels.host_moe unavailable ({reason}); the CPU MoE layer uses the blocked layout",
                  RuntimeWarning, stacklevel=2)
