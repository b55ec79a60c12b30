"""Every checkpoint problem raises an error that names it; save never leaves a half-written directory."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deepseek_jax.interop import hf, safetensors_io
import test_hf_roundtrip  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_cfg):
  """A valid float32 checkpoint of the tiny preset (with its MTP layer)."""
  path = tmp_path_factory.mktemp("valid") / "ckpt"
  _, variables = test_hf_roundtrip._random_model(tiny_cfg)  # pylint: disable=protected-access
  hf.save(path, tiny_cfg, variables)
  return path


def _edit(src, dst, change=None, config_change=None):
  shutil.copytree(src, dst)
  if change is not None:
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  if config_change is not None:
    with open(dst / "config.json") as f:
      config = json.load(f)
    config_change(config)
    with open(dst / "config.json", "w") as f:
      json.dump(config, f)
  return dst


def test_no_config_json(tmp_path, ckpt):
  d = _edit(ckpt, tmp_path / "c")
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load(d)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load(tmp_path / "nowhere")


def test_unsupported_model_type(tmp_path, ckpt):
  d = _edit(ckpt, tmp_path / "c", config_change=lambda c: c.update(model_type="llama"))
  with pytest.raises(ValueError, match="model_type='llama' is not supported"):
    hf.load(d)


def test_missing_tensor_is_named(tmp_path, ckpt):
  d = _edit(ckpt, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.experts.6.up_proj.weight"))
  with pytest.raises(hf.CheckpointError, match=r"lacks .*model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight"):
    hf.load(d)


def test_wrong_shape_names_tensor_expected_and_found(tmp_path, ckpt):
  def change(t):
    t["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((4 * 32, 31), np.float32)
  d = _edit(ckpt, tmp_path / "c", change)
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight: expected "
                                               r"shape \(128, 32\) .*found \(128, 31\)"):
    hf.load(d)


def test_unexpected_tensors_are_listed(tmp_path, ckpt, tiny_cfg):
  def change(t):
    t["model.layers.0.mlp.extra.weight"] = np.zeros((3,), np.float32)
    t["model.layers.7.input_layernorm.weight"] = np.zeros((3,), np.float32)
  d = _edit(ckpt, tmp_path / "c", change)
  with pytest.raises(hf.CheckpointError, match=r"no place for: model\.layers\.0\.mlp\.extra\.weight, "
                                               r"model\.layers\.7\.input_layernorm\.weight"):
    hf.load(d)
  with pytest.warns(UserWarning, match="no place for"):
    cfg, _ = hf.load(d, strict=False)
  assert cfg.num_hidden_layers == tiny_cfg.num_hidden_layers


def test_fp8_weight_without_scale(tmp_path, ckpt):
  name = "model.layers.2.self_attn.o_proj.weight"
  d = _edit(ckpt, tmp_path / "c", lambda t: t.update({name: t[name].astype(ml_dtypes.float8_e4m3fn)}))
  with pytest.raises(hf.CheckpointError, match=rf"FP8 weight {name} .*no {name}_scale_inv"):
    hf.load(d)


def test_fp8_scale_of_wrong_shape(tmp_path, ckpt):
  name = "model.layers.2.self_attn.o_proj.weight"
  def change(t):
    t[name] = t[name].astype(ml_dtypes.float8_e4m3fn)
    t[name + "_scale_inv"] = np.ones((5, 5), np.float32)
  d = _edit(ckpt, tmp_path / "c", change)
  with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(5, 5\), expected \(1, 1\)"):
    hf.load(d)


def test_config_with_mtp_but_no_mtp_tensors_loads_without_mtp(tmp_path, ckpt, tiny_cfg):
  n = tiny_cfg.num_hidden_layers
  d = _edit(ckpt, tmp_path / "c", lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{n}.")])
  with pytest.warns(UserWarning, match=r"num_nextn_predict_layers=1.*0 MTP layer.*MTP disabled"):
    cfg, variables = hf.load(d)
  assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in variables["params"]


def test_save_checks_variables_and_never_leaves_partial_output(tmp_path, tiny_cfg, monkeypatch):
  _, variables = test_hf_roundtrip._random_model(tiny_cfg)  # pylint: disable=protected-access
  broken = {"params": dict(variables["params"]), "router": variables["router"]}
  del broken["params"]["norm"]
  with pytest.raises(hf.CheckpointError, match="variables lack params/norm/weight"):
    hf.save(tmp_path / "a", tiny_cfg, broken)
  with pytest.raises(hf.CheckpointError, match=r"variable params/layers_0/mlp/gate_proj/kernel: expected "
                                               r"shape \(64, 128\).*found \(64, 127\)"):
    bad = {"params": dict(variables["params"]), "router": variables["router"]}
    layer = dict(bad["params"]["layers_0"])
    layer["mlp"] = dict(layer["mlp"], gate_proj={"kernel": np.zeros((64, 127), np.float32)})
    bad["params"]["layers_0"] = layer
    hf.save(tmp_path / "a", tiny_cfg, bad)
  calls = []
  real = safetensors_io.write_file

  def failing(path, tensors, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    real(path, tensors, metadata)
  monkeypatch.setattr(safetensors_io, "write_file", failing)
  with pytest.raises(OSError, match="disk full"):
    hf.save(tmp_path / "out", tiny_cfg, variables, max_shard_size="200KB")
  assert os.listdir(tmp_path) == []  # neither the target nor the temporary directory
  monkeypatch.undo()
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    hf.save(tmp_path / "full", tiny_cfg, variables)
