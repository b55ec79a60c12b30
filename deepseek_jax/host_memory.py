"""Keeping freed host memory in the process, so that XLA:CPU's per-step buffers are not page-faulted in anew.

XLA:CPU allocates each execution's temporary buffer (about 150 MB for the 6.5M-parameter bench config's
train step) and its outputs with `malloc` from its worker threads. glibc serves an allocation that large
from a fresh `mmap` (a worker thread's arena cannot hold it) and unmaps it on `free`, so every step touches
its working set on fresh pages: about 45,000 page faults and some 80 ms of kernel time per step on 2 cores,
13% of the CPU time. `retain_freed_memory()` sets glibc's allocator (`mallopt`) to serve every allocation
from the main heap and never to hand freed memory back to the system, so the pages of one step are reused
by the next: kernel time falls to under 10 ms per step. The cost is that the process keeps its peak heap.

It acts on the whole process (a PyTorch model in the same process gains as much), and the arena setting
binds only threads that allocate afterwards: call it before JAX starts its CPU backend, as the command
lines (`experiments.train`, `experiments.bench`) do. glibc on Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (see the module docstring); returns whether it did.

  Idempotent. Returns False, changing nothing, where the C library is not glibc. Warns when JAX's backends
  have already started, since their threads keep the arenas they have.
  """
  if _applied:
    return _applied[0]
  ok = False
  if sys.platform.startswith("linux"):
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
