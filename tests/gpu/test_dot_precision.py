"""The kernels' dots run at the precision their dtype asks for, whatever `jax_default_matmul_precision` is:
full float32 (never TF32) for float32 operands, the native MMA for bf16. Checked on the kernels as built
for the GPU (compiled, GPU block sizes), on CPU."""

import jax
import jax.numpy as jnp
import pytest

from kernels import _common
from kernels import grouped_matmul as gm
from kernels import mla_attention as ma
from kernels import mla_decode as md


def _dot_precisions(jaxpr):
  """Precision of every dot_general inside the pallas_call kernels of a closed jaxpr."""
  found = []

  def walk(jx, in_kernel):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general" and in_kernel:
        found.append(eqn.params["precision"])
      for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") \
          else _subjaxprs(eqn.params):
        walk(sub, in_kernel or eqn.primitive.name == "pallas_call")

  walk(jaxpr.jaxpr, False)
  return found


def _subjaxprs(params):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr


def _cases(dtype):
  f = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  attn = lambda q, k, v: jax.grad(lambda q, k, v: ma.flash_attention(q, k, v).astype(
      jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
  dec = lambda a, b, c, d, e: md.mla_decode(a, b, c, d, e, sm_scale=0.1)
  grp = lambda x, w, g: jax.grad(lambda x, w: gm.gmm(x, w, g).astype(jnp.float32).sum(),
                                 argnums=(0, 1))(x, w)
  return {"flash": (attn, (f(1, 64, 2, 48), f(1, 64, 2, 48), f(1, 64, 2, 32))),
          "decode": (dec, (f(2, 1, 4, 64), f(2, 1, 4, 16), f(2, 128, 64), f(2, 128, 16), i32(2))),
          "gmm": (grp, (f(128, 64), f(4, 64, 64), i32(4)))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["flash", "decode", "gmm"])
def test_kernel_dot_precision(kernel, dtype):
  fn, args = _cases(jnp.dtype(dtype))[kernel]
  with jax.default_matmul_precision("tensorfloat32"), _common.target_backend("gpu"):
    jax.clear_caches()
    precisions = _dot_precisions(jax.make_jaxpr(fn)(*args))
  jax.clear_caches()
  assert precisions, f"{kernel}: no dot found inside a pallas_call"
  for p in precisions:
    got = p[0] if isinstance(p, tuple) else p
    if dtype == "float32":
      assert got == jax.lax.Precision.HIGHEST, f"{kernel} float32: dot precision {p}, not HIGHEST"
    else:   # bf16 operands: the native MMA (the context's default), nothing upcast
      assert got != jax.lax.Precision.HIGHEST, f"{kernel} bf16: dot precision {p}"
