"""FLOPs per token and KV cache per token: DeepSeek-V3 figures, and the count of the model's own program.

Two independent references for the model's products:
- the jaxpr: every dot_general / ragged_dot_general the traced program executes (forward, value_and_grad
  of the cross-entropy, checkpoint recomputation included), counted exactly from the operand shapes;
- XLA's `compile().cost_analysis()['flops']`, which also counts elementwise work, so it is compared within
  a few percent on configs whose widths make the products dominate.
What the model computes beyond the analytic convention is added explicitly: the MoE combine
(sum_k w_k y_k, a [T,K]x[T,K,D] product, 2 K D per token and MoE block) and, for moe_impl='dense', the
E - K experts it runs on every token besides the routed ones (plus its [T,E] combine).  Attention is the
masked dense reference path, so the comparison uses the `causal=False` (all S keys) convention.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.analysis import flops as F
from deepseek_jax.config import ModelConfig

V3 = ModelConfig.preset("deepseek-v3")

# docs/reference.md: exact parameter arithmetic of the V3 config.
V3_ACTIVE = 37_552_297_472
V3_EMBED = 926_679_040
V3_ATTN_PARAMS = 187_107_328
V3_DENSE_MLP_PARAMS = 396_361_728
V3_EXPERT_PARAMS = 44_040_192
V3_GATE_PARAMS = 1_835_008


# ------------------------------------------------------------------ jaxpr product counter


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general / ragged_dot_general in a jaxpr, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      total += 2 * math.prod(a) * math.prod(d for i, d in enumerate(b) if i not in rc and i not in rb)
    elif name == "ragged_dot_general":
      dn = eqn.params["ragged_dot_dimension_numbers"]
      (_, rc), (_, rb) = dn.dot_dimension_numbers
      skip = set(rc) | set(rb) | set(dn.rhs_group_dimensions)
      a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      total += 2 * math.prod(a) * math.prod(d for i, d in enumerate(b) if i not in skip)
    mult = eqn.params.get("length", 1) if name == "scan" else 1
    assert name != "while", "a while loop's trip count is unknown to the counter"
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += mult * _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += mult * _dot_flops(sub)
  return total


def test_dot_counter_on_known_products():
  x, w = jnp.ones((6, 5)), jnp.ones((5, 7))
  assert _dot_flops(jax.make_jaxpr(jnp.dot)(x, w).jaxpr) == 2 * 6 * 5 * 7
  q, k = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 9, 4, 8))
  f = lambda q, k: jnp.einsum("BSHK,BTHK->BHST", q, k)
  assert _dot_flops(jax.make_jaxpr(f)(q, k).jaxpr) == 2 * 2 * 4 * 3 * 9 * 8
  xs, ws, gs = jnp.ones((12, 5)), jnp.ones((3, 5, 7)), jnp.array([4, 4, 4], jnp.int32)
  g = jax.grad(lambda x, w: jax.lax.ragged_dot(x, w, gs).sum(), argnums=(0, 1))
  # forward, dx, dw: each 2 x 12 x 5 x 7 (every row meets one group's weights).
  assert _dot_flops(jax.make_jaxpr(g)(xs, ws).jaxpr) == 3 * 2 * 12 * 5 * 7


# ------------------------------------------------------------------ tiny configs built from the model

BATCH, SEQ = 2, 64
WIDE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1, num_nextn_predict_layers=1,
            max_position_embeddings=1024, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=64, n_group=4, topk_group=2)


def _cfg(**kw):
  # XLA's attention and matmuls: the products of a host kernel's custom call are invisible to the jaxpr and
  # to XLA's cost analysis, which these tests count.
  return ModelConfig.preset("tiny", **{**WIDE, "attention_impl": "xla", "matmul_impl": "xla", **kw})


def _programs(cfg):
  """(forward, value_and_grad of main + MTP cross-entropy, params, rest, tokens) of the model."""
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  model = DeepSeekV3(cfg)
  tokens = (jnp.arange(BATCH * SEQ, dtype=jnp.int32).reshape(BATCH, SEQ) * 7) % cfg.vocab_size
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def forward(p, r, t):
    out = model.apply({"params": p, **r}, t)
    return out.logits, out.mtp_logits

  def ce(logits, t):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))

  def loss(p, r, t):
    logits, mtp = forward(p, r, t)
    return ce(logits, t) + sum(0.3 * ce(m, t) for m in mtp)

  return forward, jax.value_and_grad(loss), params, rest, tokens


def _extra_moe_products(cfg, *, experts_run: int) -> float:
  """Forward products per token the model runs beyond the analytic count: the combine, and experts
  run on every token besides the K routed ones (moe_impl='dense')."""
  if cfg.n_routed_experts is None:
    return 0.0
  blocks = cfg.num_moe_layers + cfg.num_nextn_predict_layers
  d, f, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
  return blocks * ((experts_run - k) * 6 * d * f + 2 * experts_run * d)


def _model_importable():
  try:
    import deepseek_jax.model  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


needs_model = pytest.mark.skipif(not _model_importable(), reason="deepseek_jax.model is not importable")


@needs_model
@pytest.mark.parametrize("routed", [None, 8])
@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_with_no_batch_dims"])
def test_products_equal_jaxpr_count(routed, policy):
  """Forward and training products of the traced model equal the analytic count exactly, for every
  checkpoint policy, on a dense model and on an MoE model with the grouped-matmul (ragged_dot) path."""
  cfg = _cfg(n_routed_experts=routed, remat_policy=policy, moe_impl="xla")
  forward, grad, params, rest, tokens = _programs(cfg)
  n = BATCH * SEQ
  fwd = _dot_flops(jax.make_jaxpr(forward)(params, rest, tokens).jaxpr) / n
  train = _dot_flops(jax.make_jaxpr(grad)(params, rest, tokens).jaxpr) / n
  extra = _extra_moe_products(cfg, experts_run=cfg.num_experts_per_tok)
  want = F.train_flops_per_token(cfg, SEQ, causal=False)
  assert fwd == want.forward + extra
  assert want.backward == 2 * want.forward
  assert train == want.hardware + 3 * extra
  if policy in ("none", "dots") and routed is None:
    assert want.recompute == 0


@needs_model
@pytest.mark.parametrize("routed", [None, 8])
def test_flops_match_xla_cost_analysis(routed):
  """XLA's own count of the compiled forward and training step, within 3% (the rest is elementwise)."""
  cfg = _cfg(n_routed_experts=routed, moe_impl="dense")
  forward, grad, params, rest, tokens = _programs(cfg)
  n = BATCH * SEQ
  xla_fwd = jax.jit(forward).lower(params, rest, tokens).compile().cost_analysis()["flops"] / n
  xla_train = jax.jit(grad).lower(params, rest, tokens).compile().cost_analysis()["flops"] / n
  extra = _extra_moe_products(cfg, experts_run=cfg.n_routed_experts or 0)
  want = F.train_flops_per_token(cfg, SEQ, causal=False)
  fwd_ratio = xla_fwd / (want.forward + extra)
  train_ratio = xla_train / (want.model + 3 * extra)
  assert 1.0 <= fwd_ratio < 1.03, fwd_ratio
  assert 1.0 <= train_ratio < 1.03, train_ratio


@needs_model
def test_absorbed_decode_equals_jaxpr_count():
  """One absorbed decode step against a cache of T slots runs exactly decode_flops_per_token(T)."""
  from deepseek_jax.model import DeepSeekV3, init_cache  # pylint: disable=g-import-not-at-top
  cfg = _cfg(moe_impl="xla", num_nextn_predict_layers=0)
  model = DeepSeekV3(cfg)
  b, t = 2, 48
  tok = jnp.ones((b, 1), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tok))
  cache = init_cache(cfg, b, t, jnp.float32)
  start = jnp.array([5, 30], jnp.int32)
  step = lambda v, c: model.apply(v, tok, cache=c, cache_start=start, absorbed=True).logits
  got = _dot_flops(jax.make_jaxpr(step)(variables, cache).jaxpr) / b
  extra = _extra_moe_products(cfg, experts_run=cfg.num_experts_per_tok)
  assert got == F.decode_flops_per_token(cfg, t)["total"] + extra


# ------------------------------------------------------------------ analytic properties


def test_causal_convention_is_the_mean_over_positions():
  for s in (1, 2, 7, 4096):
    brute = np.mean([t + 1 for t in range(s)])  # query t sees keys 0..t
    assert F.attended_keys(s, causal=True) == brute
    assert F.attended_keys(s, causal=False) == s
  scores, values = F.attention_flops(V3, 4096, causal=True)
  assert scores == 2 * 128 * 192 * 4097 / 2 and values == 2 * 128 * 128 * 4097 / 2
  full = F.forward_flops_per_token(V3, 4096, causal=False)
  causal = F.forward_flops_per_token(V3, 4096, causal=True)
  assert full.attention == pytest.approx(causal.attention * 2 * 4096 / 4097)
  assert full.main - full.attention == causal.main - causal.attention


def test_v3_components_match_reference_parameter_counts():
  """Each component is 2 x its matmul parameters (docs/reference.md's per-layer counts, norms removed)."""
  b = F.forward_flops_per_token(V3, 4096)
  norms_in_attn = V3.q_lora_rank + V3.kv_lora_rank  # q_a_layernorm, kv_a_layernorm
  assert F.mla_projection_flops(V3) == 2 * (V3_ATTN_PARAMS - norms_in_attn)
  assert b.mla_projections == 61 * 2 * (V3_ATTN_PARAMS - norms_in_attn)
  assert b.dense_mlp == 3 * 2 * V3_DENSE_MLP_PARAMS
  assert b.routed_experts == 58 * 8 * 2 * V3_EXPERT_PARAMS
  assert b.shared_experts == 58 * 2 * V3_EXPERT_PARAMS
  assert b.router == 58 * 2 * V3_GATE_PARAMS
  assert b.head == 2 * V3_EMBED
  mtp = b.mtp_parts
  assert mtp["eh_proj"] == 2 * 7168 * 14336
  assert mtp["block"] == (2 * (V3_ATTN_PARAMS - norms_in_attn) + sum(F.attention_flops(V3, 4096))
                          + 2 * (9 * V3_EXPERT_PARAMS + V3_GATE_PARAMS))
  assert mtp["head"] == 2 * V3_EMBED
  assert b.total == b.main + b.mtp


def test_v3_train_flops_against_6n_active():
  """Model FLOPs = 6 N_active, less the embedding, norms and router bias (no products), plus 3x the
  attention core and the MTP module; without attention and MTP, within 3% of 6 N_active."""
  norms = 61 * (2 * 7168 + 1536 + 512) + 7168
  bias = 58 * 256
  b = F.forward_flops_per_token(V3, 4096)
  t = F.train_flops_per_token(V3, 4096)
  six_n = 6 * V3_ACTIVE
  assert t.model == 3 * b.total
  assert t.model - 3 * (b.attention + b.mtp) == 6 * (V3_ACTIVE - V3_EMBED - norms - bias)
  assert abs((t.model - 3 * (b.attention + b.mtp)) / six_n - 1) < 0.03
  # Whole count at 4K: 260.6 GFLOP/token, 1.157 x 6 N_active (attention +13.6%, MTP +4.5%).
  assert t.model == pytest.approx(260.649e9, rel=1e-5)
  assert 1.10 < t.model / six_n < 1.20
  assert t.recompute == 0 and t.hardware == t.model


def test_v3_remat_full_recomputes_blocks_without_residual_down_proj():
  t = F.train_flops_per_token(V3, 4096, remat_policy="full")
  b = F.forward_flops_per_token(V3, 4096)
  residual_only = 3 * 2 * 7168 * 18432 + 58 * 2 * 7168 * 2048
  assert t.recompute == b.main - b.head - residual_only
  assert t.hardware == t.model + t.recompute
  assert F.train_flops_per_token(V3, 4096, remat_policy="dots").recompute == b.routed_experts
  with pytest.raises(ValueError, match="remat_policy"):
    F.train_flops_per_token(V3, 4096, remat_policy="some")


def test_v3_kv_cache_per_token():
  assert F.kv_cache_elements_per_token(V3) == 35_136
  assert F.kv_cache_bytes_per_token(V3) == 70_272
  assert F.kv_cache_bytes_per_token(V3, dtype="fp8") == 35_136
  assert F.kv_cache_elements_per_token(V3, "mha") == 61 * 40_960
  assert F.kv_cache_elements_per_token(V3, "mqa") == 61 * 320
  assert F.kv_cache_elements_per_token(V3, "gqa", num_kv_heads=8) == 61 * 8 * 320
  assert F.kv_cache_elements_per_token(V3, "gqa", num_kv_heads=128) == 61 * 40_960
  assert F.kv_cache_elements_per_token(V3, include_mtp=True) == 62 * 576
  # MLA caches 1/71 of the MHA cache of the same model.
  assert F.kv_cache_elements_per_token(V3, "mha") / F.kv_cache_elements_per_token(V3) == \
      pytest.approx(40_960 / 576)
  with pytest.raises(ValueError, match="num_kv_heads"):
    F.kv_cache_elements_per_token(V3, "gqa", num_kv_heads=3)
  with pytest.raises(ValueError, match="kind"):
    F.kv_cache_elements_per_token(V3, "mla2")


def test_v3_decode_absorbed_trades_flops_for_cache_reads():
  t = 32_768
  ab = F.decode_flops_per_token(V3, t, absorbed=True)
  naive = F.decode_flops_per_token(V3, t, absorbed=False)
  assert ab["attention"] == 61 * 2 * 128 * (2 * 512 + 64) * t
  assert naive["attention"] == 61 * 2 * 128 * (192 + 128) * t
  # Absorption moves kv_b's work from every cached key to the one query: projections differ by
  # 2 H (Dn Dc + Dc Dv) - 2 Dc H (Dn + Dv) = 0.
  assert ab["projections"] == naive["projections"]
  b = F.forward_flops_per_token(V3, 1)
  assert ab["ffn"] == naive["ffn"] == b.dense_mlp + b.routed_experts + b.shared_experts + b.router
  assert ab["total"] == sum(ab[k] for k in ("projections", "attention", "ffn", "head"))


def test_plain_q_proj_and_dense_models():
  lite = ModelConfig.preset("deepseek-v2-lite")
  h, d = 16, 2048
  assert F.mla_projection_flops(lite) == 2 * (d * h * 192 + d * 576 + 512 * h * 256 + h * 128 * d)
  dense = ModelConfig.preset("tiny", n_routed_experts=None)
  b = F.forward_flops_per_token(dense, 16)
  assert b.routed_experts == b.shared_experts == b.router == 0
  assert b.dense_mlp == 3 * 6 * 64 * 128
  assert b.mtp_parts["block"] == F.mla_projection_flops(dense) + sum(F.attention_flops(dense, 16)) \
      + 6 * 64 * 128
  assert F.forward_flops_per_token(dense, 16, include_mtp=False).mtp == 0
