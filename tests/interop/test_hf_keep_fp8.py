"""FP8 checkpoints kept as E4M3 on device: `load(..., keep_fp8=True)` holds the checkpoint's codes and scales
bit for bit, and the fp8_weights model computes the logits of the dequantized model."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.interop import fp8_variables, hf, hf_names, safetensors_io
from deepseek_jax.interop.placement import abstract_variables

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
# Widths past 128 with ragged edge blocks (200 = 128 + 72, expert width 136, q_lora 136, heads x qk 2 x 32).
CFG = dsj.ModelConfig.preset(
    "tiny", vocab_size=96, hidden_size=200, intermediate_size=300, moe_intermediate_size=136,
    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=136, kv_lora_rank=72, qk_nope_head_dim=24,
    qk_rope_head_dim=8, v_head_dim=20, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
    initializer_range=0.05, moe_impl="dense")  # the dense reference dispatch: fastest to trace


def random_variables(cfg, seed=0):
  """Random variables of cfg's model from its shapes (NumPy: no init to compile); norms around 1."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "weight":
      return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract_variables(cfg))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  base = tmp_path_factory.mktemp("keep_fp8")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, CFG.vocab_size)
  variables = random_variables(CFG)
  hf.save(base / "fp8", CFG, variables, fp8=True)
  hf.save(base / "fp32", CFG, variables)
  return base, tokens


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def test_keep_fp8_holds_the_checkpoint_codes_and_scales(checkpoint):
  base, _ = checkpoint
  cfg8, v8, report = hf.load_with_report(base / "fp8", keep_fp8=True)
  assert cfg8.fp8_weights and cfg8.fp8_weight_block == 128
  ckpt = safetensors_io.Checkpoint(str(base / "fp8"))
  checked = 0
  for e in hf_names.entries(cfg8):
    if not e.fp8 or e.alias:
      continue
    codes = _leaf(v8[e.collection], e.path)
    scale = _leaf(v8[e.collection], e.path[:-1] + (e.path[-1] + "_scale_inv",))
    assert codes.dtype == E4M3 and scale.dtype == np.float32
    w, s = ckpt.read(e.hf), ckpt.read(hf_names.scale_name(e.hf))
    if e.kind == "expert":
      codes, scale = codes[e.expert], scale[e.expert]
    else:
      codes = codes.reshape(w.shape[1], w.shape[0])
    # Bit for bit: the [out, in] codes transposed, the [out/128, in/128] scales transposed.
    np.testing.assert_array_equal(codes.view(np.uint8), w.T.view(np.uint8))
    np.testing.assert_array_equal(scale, s.T)
    checked += 1
  assert checked == report.fp8_kept > 0 and report.fp8_quantized == 0 and report.fp8_dequantized == 0
  # Scale shapes of the ragged 200-wide model: q_a_proj [200, 136] -> 2 x 2 blocks.
  assert v8["params"]["layers_0"]["self_attn"]["q_a_proj"]["kernel_scale_inv"].shape == (2, 2)
  assert v8["params"]["layers_1"]["mlp"]["experts"]["down_proj_scale_inv"].shape == (4, 2, 2)


def test_fp8_weights_logits_equal_the_dequantized_model(checkpoint):
  base, tokens = checkpoint
  cfg, v = hf.load(base / "fp8")
  cfg8, v8 = hf.load(base / "fp8", keep_fp8=True)
  ref = jax.jit(dsj.DeepSeekV3(cfg).apply)(v, tokens)
  out = jax.jit(dsj.DeepSeekV3(cfg8).apply)(v8, tokens)
  scale = float(np.abs(ref.logits).max())
  err = float(np.abs(out.logits - ref.logits).max()) / scale
  err_mtp = float(np.abs(out.mtp_logits[0] - ref.mtp_logits[0]).max()) / scale
  print(f"fp8_weights vs dequantized logits: max rel err {err:.2e} (mtp {err_mtp:.2e})")
  assert err <= 1e-5 and err_mtp <= 1e-5
  # The quantized tensors take half their bf16 bytes (plus one fp32 scale per 128 x 128 block).
  mem = fp8_variables.weight_memory(cfg8)
  print("memory:", mem)
  assert 0.5 < mem["quantized_ratio"] < 0.51
  assert mem["ratio"] < 1.0 and mem["fp8"] < mem["bf16"]


def test_keep_fp8_quantizes_a_higher_precision_checkpoint(checkpoint):
  base, _ = checkpoint
  cfg, v = hf.load(base / "fp32")
  cfg8, v8, report = hf.load_with_report(base / "fp32", keep_fp8=True)
  assert report.fp8_quantized > 0 and report.fp8_kept == 0
  # Same as quantizing the loaded model in memory, and as the FP8 file written by save(fp8=True).
  cfg_q, v_q = fp8_variables.quantize_variables(cfg, v)
  assert cfg_q == cfg8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
               v8, v_q)
  _, v_file = hf.load(base / "fp8", keep_fp8=True)
  ek = ("params", "layers_1", "mlp", "experts", "gate_proj")
  np.testing.assert_array_equal(_leaf(v8, ek).view(np.uint8), _leaf(v_file, ek).view(np.uint8))
  # And back: dequantize_variables gives the FP8 set's weights exactly as the ordinary load of the FP8 file
  # (whose other tensors save(fp8=True) wrote in bf16).
  cfg_d, v_d = fp8_variables.dequantize_variables(cfg8, v8)
  cfg_f, v_f = hf.load(base / "fp8")
  assert cfg_d == cfg_f
  for path in fp8_variables.fp8_layout(cfg8):
    np.testing.assert_array_equal(_leaf(v_d, path), _leaf(v_f, path))


def test_keep_fp8_rejects_non_square_blocks(tmp_path):
  cfg = CFG.replace(num_nextn_predict_layers=0)
  v = random_variables(cfg)
  hf.save(tmp_path / "c", cfg, v, fp8=True, block_size=(64, 128))
  with pytest.raises(hf.CheckpointError, match="weight_block_size"):
    hf.load(tmp_path / "c", keep_fp8=True)
