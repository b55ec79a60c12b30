"""HF checkpoint round trips: transformers -> load -> save -> transformers, shards, MTP layer, orbax, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import deepseek_jax as dsj
from deepseek_jax.interop import hf, orbax_io, placement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _hf_tensors(path):
  """All tensors of a (possibly sharded) float checkpoint, read with the safetensors package."""
  out = {}
  for fn in sorted(os.listdir(path)):
    if fn.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, fn)))
  return out


def _random_model(cfg, seed=0):
  """Random variables in init's structure (from its abstract shapes: no forward pass), every parameter off
  its neutral value (norm weights around 1, router bias nonzero)."""
  rng = np.random.default_rng(seed)
  abstract = placement.abstract_variables(cfg)
  def draw(x):
    a = rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(1.0 + 0.2 * a if x.ndim == 1 else 0.1 * a, x.dtype)
  return dsj.DeepSeekV3(cfg), jax.tree_util.tree_map(draw, abstract)


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_transformers_load_save_transformers(tmp_path, kind):
  pytest.importorskip("transformers")
  import hf_tiny  # pylint: disable=g-import-not-at-top
  overrides = dict(topk_method="group_limited_greedy", n_group=4, topk_group=2) if kind == "v2" else {}
  ref = hf_tiny.build(kind, seed=3, rms_norm_eps=1e-6, **overrides)
  ref.save_pretrained(tmp_path / "hf")
  cfg, variables = hf.load(tmp_path / "hf")
  hf.save(tmp_path / "ours", cfg, variables)
  # The tensors written are exactly transformers' own (per-expert names, [out, in] layout, values).
  theirs, ours = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "ours")
  assert sorted(theirs) == sorted(ours)
  for name, t in theirs.items():
    np.testing.assert_array_equal(ours[name], t, err_msg=name)
  back = type(ref).from_pretrained(tmp_path / "ours", attn_implementation="eager", dtype="float32")
  tokens = hf_tiny.tokens(cfg.vocab_size, batch=2, seq=24)
  np.testing.assert_array_equal(hf_tiny.logits(back, tokens), hf_tiny.logits(ref, tokens))
  with open(tmp_path / "ours" / "config.json") as f:
    written = json.load(f)
  assert written["model_type"] == ("deepseek_v3" if kind == "v3" else "deepseek_v2")
  assert written["rope_scaling"]["mscale_all_dim"] == (0.6 if kind == "v3" else 0.707)
  assert written["num_nextn_predict_layers"] == 0


def test_sharded_load_equals_single_file(tmp_path, tiny_cfg):
  _, variables = _random_model(tiny_cfg)
  hf.save(tmp_path / "one", tiny_cfg, variables)
  hf.save(tmp_path / "many", tiny_cfg, variables, max_shard_size="150KB")
  files = sorted(os.listdir(tmp_path / "many"))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 3 and "model.safetensors.index.json" in files
  assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
  with open(tmp_path / "many" / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards
  tensors = _hf_tensors(tmp_path / "many")
  assert sorted(index["weight_map"]) == sorted(tensors)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for fn in shards:  # each shard within the limit unless it holds a single larger tensor
    size = os.path.getsize(tmp_path / "many" / fn)
    assert size < 150_000 + 8192 or len(load_file(tmp_path / "many" / fn)) == 1
  cfg1, v1 = hf.load(tmp_path / "one")
  cfg2, v2 = hf.load(tmp_path / "many")
  assert cfg1 == cfg2
  _tree_equal(v1, v2)
  _tree_equal(v1, variables)


def test_mtp_layer_roundtrip(tmp_path, tiny_cfg):
  model, variables = _random_model(tiny_cfg, seed=5)
  hf.save(tmp_path / "ckpt", tiny_cfg, variables)
  tensors = _hf_tensors(tmp_path / "ckpt")
  n = tiny_cfg.num_hidden_layers
  p = variables["params"]
  # The MTP depth is HF layer n: its own weights, plus copies of the shared embedding and head.
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.eh_proj.weight"],
                                np.asarray(p["mtp_0"]["eh_proj"]["kernel"]).T)
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.enorm.weight"],
                                np.asarray(p["mtp_0"]["enorm"]["weight"]))
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.shared_head.norm.weight"],
                                np.asarray(p["mtp_0"]["shared_head_norm"]["weight"]))
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.embed_tokens.weight"],
                                tensors["model.embed_tokens.weight"])
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.shared_head.head.weight"], tensors["lm_head.weight"])
  np.testing.assert_array_equal(tensors[f"model.layers.{n}.mlp.experts.3.up_proj.weight"],
                                np.asarray(p["mtp_0"]["block"]["mlp"]["experts"]["up_proj"][3]).T)
  np.testing.assert_array_equal(
      tensors[f"model.layers.{n}.mlp.gate.e_score_correction_bias"],
      np.asarray(variables["router"]["mtp_0"]["block"]["mlp"]["gate"]["e_score_correction_bias"]))
  cfg, loaded = hf.load(tmp_path / "ckpt")
  assert cfg.num_nextn_predict_layers == 1
  _tree_equal(loaded, variables)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  a, b = model.apply(variables, tokens), dsj.DeepSeekV3(cfg).apply(loaded, tokens)
  np.testing.assert_array_equal(np.asarray(a.mtp_logits[0]), np.asarray(b.mtp_logits[0]))
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_transformers_reads_a_checkpoint_with_mtp(tmp_path, tiny_cfg):
  """transformers ignores the MTP layer and computes the same main logits from our file."""
  transformers = pytest.importorskip("transformers")
  import hf_tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny_cfg.replace(rms_norm_eps=1e-6)
  model, variables = _random_model(cfg, seed=7)
  hf.save(tmp_path / "ckpt", cfg, variables)
  theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager",
                                                              dtype="float32")
  tokens = hf_tiny.tokens(cfg.vocab_size, batch=2, seq=20)
  ours = np.asarray(model.apply(variables, jnp.asarray(tokens)).logits)
  assert hf_tiny.rel_err(ours, hf_tiny.logits(theirs, tokens)) < 1e-5


def test_orbax_roundtrip_and_convert_cli(tmp_path, tiny_cfg):
  _, variables = _random_model(tiny_cfg, seed=9)
  hf.save(tmp_path / "hf", tiny_cfg, variables)
  dsj.data.ByteTokenizer().save(tmp_path / "hf")   # the tokenizer goes along both ways
  orbax_io.save_variables(tmp_path / "direct", tiny_cfg, variables)
  cfg, restored = orbax_io.load_variables(tmp_path / "direct")
  assert cfg == tiny_cfg
  _tree_equal(restored, variables)
  # A model_config.json that is not the model's, or not a config at all, is named in one ValueError.
  config_file = tmp_path / "direct" / orbax_io.CONFIG_FILE
  saved = json.loads(config_file.read_text())
  for change, match in (({"num_hidden_layers": 2}, "cannot restore the variables"),
                        ({"bogus": 1}, r"\['bogus'\] are not ModelConfig fields"),
                        ({"hidden_size": -1}, "hidden_size=-1")):
    config_file.write_text(json.dumps(dict(saved, **change)))
    with pytest.raises(ValueError, match=match):
      orbax_io.load_variables(tmp_path / "direct")
  config_file.write_text("[1]")
  with pytest.raises(ValueError, match="expected a JSON object"):
    orbax_io.load_variables(tmp_path / "direct")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.convert", *args], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=300)
  r = run(f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'orbax'}")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["mtp_layers"] == 1 and summary["fp8_dequantized"] == 0
  assert summary["tensors"] == len(_hf_tensors(tmp_path / "hf")) - 2  # the MTP copies are skipped
  cfg2, converted = orbax_io.load_variables(tmp_path / "orbax")
  assert cfg2 == tiny_cfg
  _tree_equal(converted, variables)
  assert isinstance(dsj.data.find_tokenizer(tmp_path / "orbax"), dsj.data.ByteTokenizer)
  r = run("--to_hf", f"--orbax_dir={tmp_path / 'orbax'}", f"--out={tmp_path / 'back'}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert isinstance(dsj.data.find_tokenizer(tmp_path / "back"), dsj.data.ByteTokenizer)
  a, b = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
