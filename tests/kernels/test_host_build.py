"""kernels.host_build: which BLAS the host kernels link or load, and that either one computes the same."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kernels import host_build

_BUILDABLE = shutil.which("c++") or shutil.which("g++")
needs_kernel = pytest.mark.skipif(not host_build.available() and not _BUILDABLE,
                                  reason=f"host kernels unavailable: {host_build.unavailable_reason()}")


@needs_kernel
def test_the_blas_is_mkl_where_its_static_libraries_are_installed():
  assert host_build.unavailable_reason() is None
  if host_build._static_mkl() is not None:   # pylint: disable=protected-access
    assert host_build.blas() == "MKL (static)"
    # MKL's symbols stay local to the library: nothing for another MKL in the process (PyTorch's) to meet.
    lib = host_build._state["lib"]           # pylint: disable=protected-access
    for symbol in ("cblas_sgemm", "MKL_Set_Num_Threads_Local", "mkl_serv_malloc"):
      with pytest.raises(AttributeError):
        getattr(lib, symbol)
  else:
    assert "openblas" in os.path.basename(host_build.blas())


_PROBE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from kernels import host_build, host_matmul, host_moe, host_attention
    from deepseek_jax.ops.attention import mla_attention_reference
    from deepseek_jax.ops.moe_dispatch import dense_experts
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    t, e, k, d, f = 96, 6, 2, 32, 16
    x = jax.random.normal(ks[0], (t, d))
    w, idx = jax.lax.top_k(jax.nn.sigmoid(jax.random.normal(ks[1], (t, e))), k)
    ws = [jax.random.normal(kk, s) * 0.1 for kk, s in zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)])]
    got = jax.jit(host_moe.host_experts)(x, idx, w, *ws)
    want = dense_experts(x, idx, w, *ws)
    moe_err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    b, s, h = 2, 80, 3
    q_nope, q_pe, k_nope, v = (jax.random.normal(kk, (b, s, h, n)) for kk, n in zip(ks[4:8], (16, 8, 16, 12)))
    k_pe = jax.random.normal(ks[7], (b, s, 8))
    args = (q_nope, q_pe, k_nope, k_pe, v)
    got = jax.jit(lambda *a: host_attention.mla_causal_attention(*a, scale=0.2))(*args)
    want = mla_attention_reference(*args, scale=0.2)
    attn_err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    a, c = jax.random.normal(ks[0], (300, 70)), jax.random.normal(ks[1], (70, 90))
    want = jnp.dot(a, c, precision='highest')
    mm_err = float(jnp.max(jnp.abs(jax.jit(host_matmul.host_matmul)(a, c) - want)) / jnp.max(jnp.abs(want)))
    print("|".join(map(str, (host_build.blas(), moe_err, attn_err, mm_err))))
""")


@needs_kernel
@pytest.mark.parametrize("blas", ["default", "openblas", "mkl"])
def test_each_blas_builds_and_matches_the_references(blas, tmp_path):
  env = dict(os.environ, DEEPSEEK_JAX_CACHE=str(tmp_path))
  env.pop("DEEPSEEK_JAX_HOST_BLAS", None)
  if blas != "default":
    env["DEEPSEEK_JAX_HOST_BLAS"] = blas
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600,
                       env=env, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  name, moe_err, attn_err, mm_err = out.stdout.strip().splitlines()[-1].split("|")
  mkl_installed = all(os.path.exists(os.path.join(sys.prefix, "lib", n)) for n in host_build._MKL_STATIC)  # pylint: disable=protected-access
  if blas == "openblas" or (blas == "mkl" and not mkl_installed):
    assert "openblas" in name
  elif blas == "mkl" and sys.platform == "linux":
    assert name == "MKL (static)"
  assert float(moe_err) < 1e-5 and float(attn_err) < 1e-5 and float(mm_err) < 1e-5, out.stdout


def test_mkl_is_chosen_on_intel_cpus_unless_the_environment_decides(monkeypatch):
  monkeypatch.delenv("DEEPSEEK_JAX_HOST_BLAS", raising=False)
  if sys.platform == "linux":
    assert host_build._cpu_vendor()  # pylint: disable=protected-access
  for vendor, want in (("GenuineIntel", True), ("AuthenticAMD", False), ("", False)):
    monkeypatch.setattr(host_build, "_cpu_vendor", lambda v=vendor: v)
    assert host_build._wants_mkl() is want  # pylint: disable=protected-access
    for choice in ("mkl", "MKL", "openblas"):
      monkeypatch.setenv("DEEPSEEK_JAX_HOST_BLAS", choice)
      assert host_build._wants_mkl() is (choice.lower() == "mkl")  # pylint: disable=protected-access
    monkeypatch.delenv("DEEPSEEK_JAX_HOST_BLAS")
