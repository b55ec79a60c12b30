"""Model properties: absorbed == naive, ragged dispatch == dense, causality, router and MTP vs references."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.layers.router import select_experts
from deepseek_jax.layers.transformer import DecoderLayer
from deepseek_jax.ops import impls


def _init(cfg, b=2, s=24, seed=0):
  model = dsj.DeepSeekV3(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (b, s), 0, cfg.vocab_size)
  variables = model.init(jax.random.PRNGKey(seed), tokens)
  # A nonzero router bias, as after training, so selection differs from the raw scores.
  if "router" in variables:
    variables["router"] = jax.tree.map(
        lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape), variables["router"])
  return model, variables, tokens


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_forward_finite_and_shaped(tiny_cfg):
  model, variables, tokens = _init(tiny_cfg)
  out = model.apply(variables, tokens)
  chex.assert_tree_all_finite(out)
  assert out.logits.shape == (2, 24, tiny_cfg.vocab_size) and len(out.mtp_logits) == 1
  assert out.tokens_per_expert.shape == (tiny_cfg.num_moe_layers + 1, tiny_cfg.n_routed_experts)
  # Every token is routed to exactly K experts in every MoE layer (dropless).
  np.testing.assert_array_equal(out.tokens_per_expert.sum(-1), 2 * 24 * tiny_cfg.num_experts_per_tok)


@pytest.mark.parametrize("q_lora", [True, False])
def test_absorbed_equals_naive(tiny_cfg, q_lora):
  cfg = tiny_cfg if q_lora else tiny_cfg.replace(q_lora_rank=None)
  model, variables, tokens = _init(cfg)
  naive = model.apply(variables, tokens)
  absorbed = model.apply(variables, tokens, absorbed=True)
  assert _rel(absorbed.logits, naive.logits) < 1e-5
  assert _rel(absorbed.mtp_logits[0], naive.mtp_logits[0]) < 1e-5


def test_cached_chunks_equal_full_forward(tiny_cfg):
  """Prefill 10 tokens into a cache, then feed the rest in chunks of 1 and 3 (absorbed)."""
  model, variables, tokens = _init(tiny_cfg, s=16)
  full = jax.jit(model.apply)(variables, tokens).logits
  cache = dsj.init_cache(tiny_cfg, 2, 32, jnp.float32)
  start = jnp.zeros((2,), jnp.int32)
  pieces = []
  apply = jax.jit(model.apply, static_argnames=("absorbed",))
  for lo, hi, absorbed in [(0, 10, False), (10, 11, True), (11, 14, True), (14, 16, False)]:
    out = apply(variables, tokens[:, lo:hi], cache=cache, cache_start=start + lo,
                absorbed=absorbed, mtp_tokens=jnp.zeros((2, hi - lo + 1), jnp.int32))
    cache = out.cache
    pieces.append(out.logits)
  assert _rel(jnp.concatenate(pieces, axis=1), full) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "blocked", "host"])
def test_ragged_dispatch_equals_dense_reference(tiny_cfg, impl):
  model, variables, tokens = _init(tiny_cfg)
  dense = dsj.DeepSeekV3(tiny_cfg.replace(moe_impl="dense"))
  ragged = dsj.DeepSeekV3(tiny_cfg.replace(moe_impl=impl))

  def loss(params, m):
    out = m.apply({"params": params, "router": variables["router"]}, tokens)
    return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits[0] ** 2)

  ld, gd = jax.jit(jax.value_and_grad(lambda p: loss(p, dense)))(variables["params"])
  lr, gr = jax.jit(jax.value_and_grad(lambda p: loss(p, ragged)))(variables["params"])
  assert abs(float(ld - lr)) <= 1e-6 * abs(float(ld))
  for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(gd)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))) + 1e-9)


def test_causality_future_tokens_do_not_change_logits(tiny_cfg):
  model, variables, tokens = _init(tiny_cfg)
  t = 11
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % tiny_cfg.vocab_size)
  a = model.apply(variables, tokens)
  b = model.apply(variables, changed)
  np.testing.assert_allclose(a.logits[:, :t], b.logits[:, :t], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(a.logits[:, t:] - b.logits[:, t:]))) > 1e-3
  # MTP at position i reads token i + 1, so its logits before t - 1 are unchanged.
  np.testing.assert_allclose(a.mtp_logits[0][:, :t - 1], b.mtp_logits[0][:, :t - 1], rtol=1e-5,
                             atol=1e-6)


def test_causality_through_gradients(tiny_cfg):
  """d logits[:, t] / d embedding(tokens[:, j]) == 0 for j > t."""
  model, variables, tokens = _init(tiny_cfg, b=1, s=12)
  cfg = tiny_cfg.replace(num_nextn_predict_layers=0)
  model = dsj.DeepSeekV3(cfg)
  params = {k: v for k, v in variables["params"].items() if not k.startswith("mtp")}
  router = {k: v for k, v in variables["router"].items() if not k.startswith("mtp")}
  emb = params["embed_tokens"]["embedding"][tokens]                      # [1, S, D]

  def logit_at(e, t):
    return jnp.take(model.apply({"params": params, "router": router}, e,
                                method=_from_embeddings).logits[0], t, axis=0).sum()

  grad = jax.jit(jax.grad(logit_at))
  for t in (3, 8):
    g = grad(emb, t)
    assert float(jnp.max(jnp.abs(g[0, t + 1:]))) == 0.0
    assert float(jnp.max(jnp.abs(g[0, :t + 1]))) > 0.0


def _from_embeddings(m, e):  # pylint: disable=invalid-name
  """The main model run from given input embeddings (for gradient-based causality)."""
  positions = jnp.arange(e.shape[1])[None]
  x = e
  for layer in m.layers:
    x, _, _ = layer(x, positions, None, None, False)
  return dsj.ModelOutput(logits=m.head(m.norm(x)))


def _router_reference(cfg, logits, bias):
  """NumPy transcription of the gate (docs/reference.md), one token at a time."""
  e, k, g = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
  out_idx, out_w = [], []
  for row in np.asarray(logits, np.float64):
    scores = 1 / (1 + np.exp(-row)) if cfg.scoring_func == "sigmoid" else np.exp(row) / np.exp(row).sum()
    choice = scores + (bias if bias is not None else 0.0)
    if cfg.topk_method != "greedy":
      groups = choice.reshape(g, e // g)
      gs = np.sort(groups, -1)[:, -2:].sum(-1) if cfg.topk_method == "noaux_tc" else groups.max(-1)
      keep = np.argsort(-gs, kind="stable")[:cfg.topk_group]
      mask = np.zeros(g, bool)
      mask[keep] = True
      choice = np.where(np.repeat(mask, e // g), choice, -np.inf)
    idx = np.argsort(-choice, kind="stable")[:k]
    w = scores[idx]
    if cfg.norm_topk_prob:
      w = w / (w.sum() + 1e-20)
    out_idx.append(np.sort(idx))
    out_w.append(w[np.argsort(idx)] * cfg.routed_scaling_factor)
  return np.array(out_idx), np.array(out_w)


@pytest.mark.parametrize("method,scoring,norm", [
    ("noaux_tc", "sigmoid", True), ("group_limited_greedy", "softmax", False),
    ("greedy", "softmax", False), ("greedy", "sigmoid", True)])
def test_router_against_reference(method, scoring, norm):
  cfg = dsj.ModelConfig.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2,
                               num_experts_per_tok=4, topk_method=method, scoring_func=scoring,
                               norm_topk_prob=norm, routed_scaling_factor=1.7)
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
  bias = np.asarray(0.1 * jax.random.normal(jax.random.PRNGKey(1), (16,)))
  scores = jax.nn.sigmoid(logits) if scoring == "sigmoid" else jax.nn.softmax(logits, -1)
  use_bias = method == "noaux_tc"
  idx, w = select_experts(cfg, scores, jnp.asarray(bias) if use_bias else None)
  order = jnp.argsort(idx, axis=-1)
  idx, w = jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(w, order, -1)
  ref_idx, ref_w = _router_reference(cfg, logits, bias if use_bias else None)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5)


def _rms(x, w, eps):
  x = np.asarray(x, np.float64)
  return np.asarray(w) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def test_mtp_logits_against_equation_21(tiny_cfg):
  """h' = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), h1 = TRM(h'), logits = head(shared_head.norm(h1))."""
  model, variables, tokens = _init(tiny_cfg)
  out = model.apply(variables, tokens)
  p = variables["params"]
  mp = p["mtp_0"]
  eps = tiny_cfg.rms_norm_eps
  emb = np.asarray(p["embed_tokens"]["embedding"])[np.concatenate(
      [np.asarray(tokens)[:, 1:], np.zeros((2, 1), np.int32)], axis=1)]
  concat = np.concatenate([_rms(emb, mp["enorm"]["weight"], eps),
                           _rms(out.hidden, mp["hnorm"]["weight"], eps)], axis=-1)
  h_in = concat @ np.asarray(mp["eh_proj"]["kernel"], np.float64)
  block = DecoderLayer(impls.resolve_config(tiny_cfg), moe=True)   # layers take concrete choices
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  h1, _, _ = block.apply({"params": mp["block"], "router": variables["router"]["mtp_0"]["block"]},
                         jnp.asarray(h_in, jnp.float32), positions)
  logits = _rms(h1, mp["shared_head_norm"]["weight"], eps) @ np.asarray(p["lm_head"]["kernel"], np.float64)
  assert _rel(out.mtp_logits[0], jnp.asarray(logits, jnp.float32)) < 1e-5


def test_bf16_compute_close_to_fp32(tiny_cfg):
  # A dense model: with MoE a bf16 rounding can flip a token's expert choice, a discrete change.
  cfg = tiny_cfg.replace(n_routed_experts=None, num_nextn_predict_layers=0)
  model, variables, tokens = _init(cfg)
  ref = model.apply(variables, tokens).logits
  bf = dsj.DeepSeekV3(dataclasses.replace(cfg, dtype="bfloat16")).apply(variables, tokens).logits
  assert bf.dtype == jnp.float32
  assert _rel(bf, ref) < 3e-2
