"""On a mesh of (compile-only) H100s, every Pallas kernel runs on its device's own shard.

XLA cannot partition a Triton custom call: given the global operands it would gather them onto every device.
The ops run the kernels per device (`deepseek_jax.ops.per_shard`); here the program is compiled by XLA's GPU
compiler for 8 H100s (data 2 x fsdp 2 x tensor 2) and each Triton call's operands must be one device's share.
Runs where a jax CUDA plugin is importable (`.ci/cuda_env.sh`), skips elsewhere.
"""

import re

import pytest

from deepseek_jax.analysis import cuda_compile as cc

AVAILABLE, WHY = cc.cuda_plugin_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

B, S, H = 8, 256, 4          # batch split 4 ways (data x fsdp), heads 2 ways (tensor)


def _triton_calls(fn, *args):
  """Result shapes of every Triton custom call in fn(*args) compiled for the 8-H100 mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepseek_jax import sharding  # pylint: disable=g-import-not-at-top
  from kernels._common import target_backend  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=cc.h100_devices(8))
  placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
            for a, spec in args]
  with target_backend("gpu"), cc.hopper_target(), jax.set_mesh(mesh), sharding.rules_context(mesh=mesh):
    text = jax.jit(fn).trace(*placed).lower().compile().as_text()
  calls = [l for l in text.splitlines() if cc.TRITON_TARGET in l and "custom-call(" in l]
  assert calls, "no Triton kernel in the compiled program"
  return [re.search(r"= \(?(\w+\[[\d,]*\])", l).group(1) for l in calls]


def test_flash_attention_runs_on_each_devices_rows_and_heads():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from deepseek_jax.ops.attention import mla_attention  # pylint: disable=g-import-not-at-top
  sds = lambda shape: jnp.zeros(shape, jnp.bfloat16)
  bh = P(("data", "fsdp"), None, "tensor", None)
  args = [(sds((B, S, H, 128)), bh), (sds((B, S, H, 64)), bh), (sds((B, S, H, 128)), bh),
          (sds((B, S, 64)), P(("data", "fsdp"))), (sds((B, S, H, 128)), bh)]
  grad = lambda *a: __import__("jax").grad(
      lambda *x: mla_attention(*x, scale=0.1, impl="pallas", interpret=False).astype(jnp.float32).sum(),
      argnums=(0, 1, 2, 3, 4))(*a)
  shapes = _triton_calls(grad, *args)
  # Forward, dq and dkv kernels: [B / 4, S, H / 2, ...] (or the log-sum-exp [B / 4, H / 2, S]).
  for shape in shapes:
    dims = [int(d) for d in shape[shape.index("[") + 1:-1].split(",")]
    assert dims[0] == B // 4 and H // 2 in dims[1:3] and H not in dims[1:3], shapes


def test_grouped_matmul_runs_on_each_devices_tokens():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from deepseek_jax.layers.moe import routed_experts  # pylint: disable=g-import-not-at-top
  t, d, f, e, k = B * S, 256, 128, 16, 4
  tok = P(("data", "fsdp"), None)
  args = [(jnp.zeros((t, d), jnp.bfloat16), tok), (jnp.zeros((t, k), jnp.int32), tok),
          (jnp.zeros((t, k), jnp.float32), tok), (jnp.zeros((e, d, f), jnp.bfloat16), P(None, "fsdp", "tensor")),
          (jnp.zeros((e, d, f), jnp.bfloat16), P(None, "fsdp", "tensor")),
          (jnp.zeros((e, f, d), jnp.bfloat16), P(None, "tensor", "fsdp"))]

  def loss(x, idx, w, wg, wu, wd):
    y = routed_experts(x, idx, w, wg, wu, wd, impl="pallas", interpret=False)
    return y.astype(jnp.float32).sum()
  shapes = _triton_calls(jax.grad(loss, argnums=(0, 3, 4, 5)), *args)
  # gmm outputs hold one device's T / 4 tokens' K rows ([T K / 4, F / 2] or [T K / 4, D]); tgmm outputs
  # are per-expert weight gradients [E, D, F / 2] / [E, F / 2, D].
  for shape in shapes:
    dims = [int(x) for x in shape[shape.index("[") + 1:-1].split(",")]
    if len(dims) == 2:
      assert dims[0] <= t * k // 4, shapes
    else:
      assert dims[0] == e and f // 2 in dims[1:], shapes


def test_decode_kernel_runs_on_each_devices_rows_and_heads():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from deepseek_jax.ops.decode import absorbed_attention  # pylint: disable=g-import-not-at-top
  bh, rows = P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, None)
  args = [(jnp.zeros((B, 1, H, 512), jnp.bfloat16), bh), (jnp.zeros((B, 1, H, 64), jnp.bfloat16), bh),
          (jnp.zeros((B, S, 512), jnp.bfloat16), rows), (jnp.zeros((B, S, 64), jnp.bfloat16), rows)]
  shapes = _triton_calls(lambda *a: absorbed_attention(*a, scale=0.1, impl="pallas", interpret=False), *args)
  # [B / 4, Sq, heads, Dc]: the kernel pads its heads to a block of 16, so only the rows are checked.
  for shape in shapes:
    assert int(shape[shape.index("[") + 1:].split(",")[0]) == B // 4, shapes
