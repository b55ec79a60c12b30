"""Keeping freed host memory in the process, so that XLA:CPU's per-step buffers are not page-faulted in anew.

XLA:CPU allocates each execution's temporary buffer and its outputs with `malloc` from its worker threads.
glibc serves an allocation that large from a fresh `mmap` (a worker thread's arena cannot hold it) and
unmaps it on `free`, so every step touches its working set on fresh pages, paying page faults and kernel
time. `retain_freed_memory()` sets glibc's allocator (`mallopt`) to serve every allocation from the main
heap and never to hand freed memory back to the system, so the pages of one step are reused by the next.
The cost is that the process keeps its peak heap.

Opt-in, for CPU runs only: it acts on the whole process (one arena, no trim, for every thread, a PyTorch
model or a checkpoint writer in the same process included), so it does nothing where a GPU backend is
present. The arena setting binds only threads that allocate afterwards: call it before JAX starts its CPU
backend, as the command lines do when asked (`--retain_freed_memory`). glibc on Linux only; elsewhere it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import sys
import warnings

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_TOP_PAD = 64 << 20          # grow the heap in steps of 64 MB
_NEVER = 2 ** 31 - 1         # the largest trim threshold mallopt takes: in effect, never trim

_applied: list = []


def _backends_started() -> bool:
  """Whether JAX has already created its backends (and with them XLA's thread pools), when it can tell."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def gpu_backend_present() -> bool:
  """Whether JAX runs (or would run) on a GPU here: its started backend, else `JAX_PLATFORMS`, else an
  installed CUDA / ROCm plugin; decided without starting a backend."""
  if _backends_started():
    import jax  # pylint: disable=g-import-not-at-top
    return jax.default_backend() != "cpu"
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return any(p.strip() in ("cuda", "gpu", "rocm") for p in platforms.split(","))
  names = set()
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names = {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  names |= {m.name for m in pkgutil.iter_modules() if m.name.startswith(("jax_cuda", "jax_rocm"))}
  return any("cuda" in n or "rocm" in n for n in names)


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (see the module docstring); returns whether it did.

  Idempotent. Returns False, changing nothing, where the C library is not glibc or a GPU backend is present
  (`gpu_backend_present`). Warns when JAX's backends have already started, since their threads keep the
  arenas they have.
  """
  if _applied:
    return _applied[0]
  ok = False
  if gpu_backend_present():
    warnings.warn("retain_freed_memory: a GPU backend is present; the allocator is left as it is (CPU runs "
                  "only)", RuntimeWarning, stacklevel=2)
  elif sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      mallopt = libc.mallopt
      gnu = bool(libc.gnu_get_libc_version)
    except (OSError, AttributeError):
      mallopt, gnu = None, False
    if mallopt is not None and gnu:
      mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
      if _backends_started():
        warnings.warn("retain_freed_memory: JAX's backends have started; XLA's existing threads keep their "
                      "own arenas, so large buffers may still be unmapped after each step",
                      RuntimeWarning, stacklevel=2)
      ok = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                (_M_TRIM_THRESHOLD, _NEVER), (_M_TOP_PAD, _TOP_PAD)))
  _applied.append(ok)
  return ok
