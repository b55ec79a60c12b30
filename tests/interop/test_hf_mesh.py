"""Streaming load onto an 8-device CPU mesh equals the unsharded load (run in a subprocess: the device count
must be set before jax is imported, and must not change for the other tests)."""

import os
import subprocess
import sys
import textwrap

from deepseek_jax.interop import hf
import test_hf_roundtrip  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from deepseek_jax.interop import hf, orbax_io

    path, out = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8
    cfg0, ref = hf.load(path)
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg, sharded = hf.load(path, mesh=mesh)
    assert cfg == cfg0
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    flat = jax.tree_util.tree_leaves(sharded)
    assert len(flat_ref) == len(flat)
    for (kp, a), b in zip(flat_ref, flat):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(kp))
      for shard in b.addressable_shards:  # every device holds exactly its slice
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(a)[shard.index])
    experts = sharded["params"]["layers_1"]["mlp"]["experts"]["down_proj"]   # [E, F, D]
    assert experts.sharding.spec == P("expert", "tensor", "fsdp"), experts.sharding.spec
    assert experts.addressable_shards[0].data.shape == (4, 16, 32)
    emb = sharded["params"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding.spec
    q_b = sharded["params"]["layers_0"]["self_attn"]["q_b_proj"]["kernel"]   # [Dq, H, Dn + Dr]
    assert q_b.sharding.spec == P(None, "tensor", None), q_b.sharding.spec
    # The same model through orbax, restored straight onto the mesh.
    orbax_io.save_variables(out, cfg, sharded)
    cfg2, restored = orbax_io.load_variables(out, mesh=mesh)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(restored)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    spec = restored["params"]["layers_1"]["mlp"]["experts"]["down_proj"].sharding.spec
    assert spec == P("expert", "tensor", "fsdp"), spec
    print("MESH_OK")
""")


def test_mesh_load_equals_unsharded_load(tmp_path, tiny_cfg):
  _, variables = test_hf_roundtrip._random_model(tiny_cfg, seed=4)  # pylint: disable=protected-access
  hf.save(tmp_path / "fp8", tiny_cfg, variables, fp8=True, block_size=(16, 16), max_shard_size="300KB")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "fp8"), str(tmp_path / "orbax")], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "MESH_OK" in r.stdout, r.stderr[-4000:]
