"""deepseek_jax.ops.impls: what 'auto' becomes on CPU and on a (simulated) GPU, the errors of combinations that
cannot run, and the one line it logs."""

import logging

import jax
import pytest

import deepseek_jax as dsj
from deepseek_jax.ops import impls


@pytest.fixture
def cfg():
  return dsj.ModelConfig.preset("tiny")


def test_cpu_auto_is_the_xla_path(cfg, caplog, monkeypatch):
  monkeypatch.setattr(impls, "_logged", set())   # each distinct resolution logs once per process
  with caplog.at_level(logging.INFO, logger="deepseek_jax.ops.impls"):
    got = impls.resolve(cfg.replace(num_hidden_layers=3), backend="cpu")
  assert (got.attention, got.decode, got.moe, got.matmul, got.interpret) == ("xla", "xla", "blocked", "xla", True)
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ["impls: attention=xla decode=xla moe=blocked matmul=xla interpret=True "
                   "(backend cpu, float32, 1 device)"]


def test_gpu_auto_uses_the_gpu_table(cfg):
  got = impls.resolve(cfg, backend="cuda", dtype="bfloat16")
  assert (got.attention, got.decode, got.moe, got.matmul, got.interpret) == (
      impls.GPU["attention"], impls.GPU["decode"], impls.GPU["moe"], impls.GPU["matmul"], False)
  assert got.describe().endswith("(backend gpu, bfloat16, 1 device)")


def test_explicit_choices_pass_and_resolved_configs_are_fixed_points(cfg):
  explicit = cfg.replace(attention_impl="pallas", moe_impl="dense")
  got = impls.resolve_config(explicit, backend="cpu")
  assert (got.attention_impl, got.decode_impl, got.moe_impl, got.matmul_impl) == ("pallas", "pallas", "dense", "xla")
  assert got.pallas_interpret is True
  assert impls.resolve_config(got, backend="cpu") == got


def test_expert_parallel_mesh_picks_grouped_matmuls(cfg):
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "expert"))
  got = impls.resolve(cfg, backend="cpu", mesh=mesh)
  assert (got.moe, got.devices, got.expert_parallel) == ("xla", 8, 4)
  with pytest.raises(ValueError, match=r"ModelConfig.moe_impl='blocked' runs one device's experts"):
    impls.resolve(cfg.replace(moe_impl="blocked"), backend="cpu", mesh=mesh)


@pytest.mark.parametrize("changes,backend,dtype,match", [
    (dict(moe_impl="host"), "cpu", "bfloat16",
     r"ModelConfig.moe_impl='host' needs float32 on one CPU device; got bfloat16 on 1 cpu device"),
    (dict(attention_impl="host"), "cuda", None, r"ModelConfig.attention_impl='host' needs float32 on one CPU"),
    (dict(matmul_impl="host", precision="fp8", moe_impl="host"), "cpu", None,
     r"ModelConfig.moe_impl='host' runs float32 GEMMs"),
    (dict(attention_impl="pallas"), "tpu", None, r"ModelConfig.attention_impl='pallas' needs a GPU"),
    (dict(moe_impl="pallas", pallas_interpret=False), "cpu", None,
     r"ModelConfig.moe_impl='pallas' runs on CPU only in interpret mode"),
    (dict(moe_impl="tokamax", precision="fp8"), "cuda", None,
     r"ModelConfig.moe_impl='tokamax' runs tokamax's ragged_dot in the compute dtype"),
])
def test_unsupported_combinations_name_the_field_and_value(cfg, changes, backend, dtype, match):
  with pytest.raises(ValueError, match=match):
    impls.resolve(cfg.replace(**changes), backend=backend, dtype=dtype)


def test_ops_refuse_an_unresolved_choice():
  from deepseek_jax.ops import matmul  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"matmul impl='auto'.*deepseek_jax.ops.impls"):
    matmul.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), impl="auto")


def test_the_default_path_loads_no_host_kernel():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import jax, jax.numpy as jnp, sys, deepseek_jax as dsj\n"
          "cfg = dsj.ModelConfig.preset('tiny', num_hidden_layers=2)\n"
          "m = dsj.DeepSeekV3(cfg); t = jnp.zeros((1, 4), jnp.int32)\n"
          "m.apply(m.init(jax.random.PRNGKey(0), t), t)\n"
          "print(sorted(k for k in sys.modules if k.startswith('kernels.host')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split("\n")[-2] == "[]"


def test_tokamax_is_chosen_only_where_it_is_installed(cfg):
  from deepseek_jax.ops import tokamax_ragged_dot  # pylint: disable=g-import-not-at-top
  tok = cfg.replace(moe_impl="tokamax")
  if tokamax_ragged_dot.available():
    assert impls.resolve(tok, backend="cuda").moe == "tokamax"
  else:
    with pytest.raises(ValueError, match=r"ModelConfig.moe_impl='tokamax' needs the tokamax package"):
      impls.resolve(tok, backend="cuda")
