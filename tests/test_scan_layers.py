"""ModelConfig.scan_layers: the scanned model computes what the per-layer model computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax import DeepSeekV3, init_cache, layer_runs, sharding, to_layer_layout
from deepseek_jax.interop import hf
from deepseek_jax.training import balance
from deepseek_jax.training.optimizer import Schedules, make_optimizer
from deepseek_jax.training.state import create_state
from deepseek_jax.training.step import make_train_step

CFG = dsj.ModelConfig.preset("tiny")
SCFG = dataclasses.replace(CFG, scan_layers=True)


@pytest.fixture(scope="module")
def variables():
  tokens = jnp.zeros((1, 8), jnp.int32)
  v = jax.jit(DeepSeekV3(CFG).init)(jax.random.PRNGKey(0), tokens)
  return v, to_layer_layout(SCFG, v)


def _apply(cfg, **static):
  return jax.jit(lambda v, tokens, **kw: DeepSeekV3(cfg).apply(v, tokens, **kw, **static))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_layer_runs():
  v3 = dsj.ModelConfig.preset("deepseek-v3")
  assert layer_runs(v3) == [("layers_0_to_2", 0, 3, False), ("layers_3_to_60", 3, 61, True)]
  assert layer_runs(CFG) == [("layers_0_to_0", 0, 1, False), ("layers_1_to_2", 1, 3, True)]
  every_other = dataclasses.replace(CFG, num_hidden_layers=5, moe_layer_freq=2)
  # first_k_dense_replace=1 and every other layer MoE: layers 0-1 dense, 2 MoE, 3 dense, 4 MoE.
  assert [r[1:] for r in layer_runs(every_other)] == [(0, 2, False), (2, 3, True), (3, 4, False),
                                                      (4, 5, True)]


def test_layout_matches_scanned_init_and_round_trips(variables):
  v, sv = variables
  scanned_init = jax.eval_shape(DeepSeekV3(SCFG).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  assert jax.tree.structure(sv) == jax.tree.structure(scanned_init)
  assert jax.tree.map(jnp.shape, sv) == jax.tree.map(jnp.shape, scanned_init)
  assert sv["params"]["layers_1_to_2"]["mlp"]["experts"]["gate_proj"].shape[0] == 2
  assert sv["router"]["layers_1_to_2"]["mlp"]["gate"]["e_score_correction_bias"].shape == (2, 8)
  back = to_layer_layout(CFG, sv)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  assert jax.tree.structure(to_layer_layout(SCFG, sv)) == jax.tree.structure(sv)  # already scanned


def test_forward_and_statistics_match(variables):
  v, sv = variables
  tokens = _tokens((2, 12))
  a = _apply(CFG)(v, tokens)
  b = _apply(SCFG)(sv, tokens)
  np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
  for x, y in zip(b.mtp_logits, a.mtp_logits):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(b.tokens_per_expert, a.tokens_per_expert)
  np.testing.assert_allclose(b.balance_loss, a.balance_loss, rtol=1e-5)


def test_cached_prefill_and_absorbed_decode_match(variables):
  v, sv = variables
  tokens = _tokens((2, 10))
  start = jnp.array([0, 3], jnp.int32)
  cache = init_cache(CFG, 2, 16, jnp.float32)
  a = _apply(CFG)(v, tokens, cache=cache, cache_start=start)
  b = _apply(SCFG)(sv, tokens, cache=cache, cache_start=start)
  np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(b.cache) == jax.tree.structure(a.cache)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), b.cache, a.cache)
  nxt = _tokens((2, 1), seed=2)
  a2 = _apply(CFG, absorbed=True)(v, nxt, cache=a.cache, cache_start=start + 10)
  b2 = _apply(SCFG, absorbed=True)(sv, nxt, cache=b.cache, cache_start=start + 10)
  np.testing.assert_allclose(b2.logits, a2.logits, rtol=1e-5, atol=1e-5)


def test_gradients_match(variables):
  v, sv = variables
  tokens = _tokens((2, 12))

  def grads(cfg, var):
    loss = lambda p: jnp.mean(DeepSeekV3(cfg).apply({"params": p, "router": var["router"]}, tokens)
                              .logits ** 2)
    return jax.jit(jax.grad(loss))(var["params"])

  ga = grads(CFG, v)
  gb = to_layer_layout(CFG, {"params": grads(SCFG, sv)})["params"]
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(gb)[0], jax.tree.leaves(ga)):
    assert _rel(x, y) < 1e-4, jax.tree_util.keystr(path)


def test_train_step_matches(variables):
  v, sv = variables
  tokens = _tokens((2, 17))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  out = {}
  for cfg, var in [(CFG, v), (SCFG, sv)]:
    tx = make_optimizer(var["params"])
    step = make_train_step(DeepSeekV3(cfg), tx, Schedules(steps=10, lr=1e-3, gamma=1e-3),
                           alpha=1e-4, donate=False)
    state, metrics = step(create_state(var, tx, jax.random.PRNGKey(1)), batch)
    out[cfg.scan_layers] = (to_layer_layout(CFG, {"params": state.params, "router": state.router}), metrics)
  (a, ma), (b, mb) = out[False], out[True]
  np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-6)
  np.testing.assert_array_equal(mb["tokens_per_expert"], ma["tokens_per_expert"])
  jax.tree.map(np.testing.assert_array_equal, b["router"], a["router"])   # the bias step is a sign
  for x, y in zip(jax.tree.leaves(b["params"]), jax.tree.leaves(a["params"])):
    np.testing.assert_allclose(x, y, atol=2e-5)  # one AdamW step of lr 1e-3: about 1e-3 per weight


def test_stacked_bias_update_matches_per_layer(variables):
  v, sv = variables
  load = jax.random.uniform(jax.random.PRNGKey(3), (CFG.num_moe_layers + 1, 8)) * 100
  a = balance.update_bias(v["router"], load, 0.01)
  b = to_layer_layout(CFG, {"router": balance.update_bias(sv["router"], load, 0.01)})["router"]
  jax.tree.map(np.testing.assert_array_equal, b, a)
  assert [p[0] for p in balance.bias_paths(sv["router"])] == ["layers_1_to_2", "mtp_0"]
  with pytest.raises(ValueError, match="3 biases"):
    balance.update_bias(sv["router"], load[:2], 0.01)


def test_logical_axes_and_shardings(variables):
  tokens = jnp.zeros((1, 1), jnp.int32)
  axes = sharding.logical_axes(DeepSeekV3(SCFG), tokens)
  expert_axes = axes["params"]["layers_1_to_2"]["mlp"]["experts"]["gate_proj"]
  assert tuple(expert_axes)[0] == "layers" and "expert" in tuple(expert_axes)
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  shardings = sharding.variable_shardings(DeepSeekV3(SCFG), mesh, tokens)
  assert jax.tree.structure(shardings["params"]) == jax.tree.structure(variables[1]["params"])


def test_hf_save_of_scanned_variables_is_per_layer(tmp_path, variables):
  v, sv = variables
  hf.save(tmp_path / "scanned", SCFG, sv)
  cfg, loaded = hf.load(tmp_path / "scanned")
  assert not cfg.scan_layers
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, v))


def test_scan_layers_must_be_bool():
  with pytest.raises(ValueError, match="scan_layers"):
    dataclasses.replace(CFG, scan_layers="yes")


def test_native_stacked_cache_matches_per_layer_cache(variables):
  v, sv = variables
  cache = init_cache(SCFG, 2, 16, jnp.float32)
  assert set(cache["layers"]) == {"layers_0_to_0", "layers_1_to_2"}
  assert cache["layers"]["layers_1_to_2"]["c_kv"].shape == (2, 2, 16, CFG.kv_lora_rank)
  tokens = _tokens((2, 10))
  start = jnp.array([0, 3], jnp.int32)
  a = _apply(CFG)(v, tokens, cache=init_cache(CFG, 2, 16, jnp.float32), cache_start=start)
  b = _apply(SCFG)(sv, tokens, cache=cache, cache_start=start)
  np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(b.cache) == jax.tree.structure(cache)
  for name, lo, hi, _ in layer_runs(CFG):
    for j, i in enumerate(range(lo, hi)):
      jax.tree.map(lambda x, y, j=j: np.testing.assert_allclose(x[j], y, rtol=1e-5, atol=1e-6),
                   b.cache["layers"][name], a.cache["layers"][i])
  nxt = _tokens((2, 1), seed=2)
  a2 = _apply(CFG, absorbed=True)(v, nxt, cache=a.cache, cache_start=start + 10)
  b2 = _apply(SCFG, absorbed=True)(sv, nxt, cache=b.cache, cache_start=start + 10)
  np.testing.assert_allclose(b2.logits, a2.logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="scan_layers layout"):
    DeepSeekV3(CFG).apply(v, nxt, cache=b.cache, cache_start=start + 10)


def test_generate_with_scanned_layers(variables):
  v, sv = variables
  prompt = _tokens((2, 6), seed=4)
  want = dsj.generate(DeepSeekV3(CFG), v, prompt, max_new_tokens=5, prompt_lengths=[6, 4])
  got = dsj.generate(DeepSeekV3(SCFG), sv, prompt, max_new_tokens=5, prompt_lengths=[6, 4])
  np.testing.assert_array_equal(got, want)
  spec = dsj.generate(DeepSeekV3(SCFG), sv, prompt, max_new_tokens=5, prompt_lengths=[6, 4],
                                speculative=True)
  np.testing.assert_array_equal(spec, want)


def test_layout_conversion_keeps_numpy_and_donates_on_request(variables):
  v, sv = variables
  host = jax.tree.map(np.asarray, v)
  stacked = to_layer_layout(SCFG, host)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stacked))
  jax.tree.map(np.testing.assert_array_equal, stacked, jax.tree.map(np.asarray, sv))
  for cfg, src, want in [(SCFG, v, sv), (CFG, sv, v)]:
    owned = jax.tree.map(jnp.copy, src)
    got = to_layer_layout(cfg, owned, donate=True)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    converted = [owned["params"][k] for k in owned["params"] if k.startswith("layers_")]
    assert converted and all(x.is_deleted() for x in jax.tree.leaves(converted))
    assert not any(x.is_deleted() for x in jax.tree.leaves(got))
