"""deepseek_jax.host_memory: freed host memory is reused, not page-faulted in anew (in fresh processes)."""

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    if sys.argv[1] == "retain":
      from deepseek_jax import host_memory
      assert host_memory.retain_freed_memory() is True
      assert host_memory.retain_freed_memory() is True          # idempotent
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 96 << 20                                                 # a step's temporary buffer, roughly
    faults = []
    def steps():                                                 # on a worker thread, as XLA allocates
      for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)                                   # touch every page
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=steps); t.start(); t.join()
    print(max(faults[1:]))                                       # the steps after the first
""")


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_buffer_is_reused_without_page_faults():
  pages = (96 << 20) // 4096
  assert _faults("system") > pages // 2        # glibc's default: unmapped on free, faulted in again
  assert _faults("retain") < pages // 20       # retained: the same pages serve every step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_warns_when_jax_has_already_started():
  code = textwrap.dedent("""
      import warnings
      import jax.numpy as jnp
      from deepseek_jax import host_memory
      jnp.ones(3).block_until_ready()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host_memory.retain_freed_memory()
      print(any("backends have started" in str(w.message) for w in caught))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "True"


def test_does_nothing_where_a_gpu_backend_is_present():
  code = textwrap.dedent("""
      import os, warnings
      os.environ["JAX_PLATFORMS"] = "cuda"
      from deepseek_jax import host_memory
      assert host_memory.gpu_backend_present()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print(host_memory.retain_freed_memory(), any("GPU backend" in str(w.message) for w in caught))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ["False", "True"]
