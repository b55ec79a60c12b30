"""FLOPs per token and KV-cache bytes per token of a DeepSeek-V2/V3 model, from its `ModelConfig` alone.

Conventions (every function below):
- One multiply-add is 2 FLOPs; only matrix products are counted (projections, attention scores and
  values, experts, router, head).  Norms, RoPE, softmax, activations and the gate's top-k are
  elementwise work of order D per token and are left out, as in the usual 6N accounting.  The embedding
  lookup is a gather: 0 FLOPs.
- Attention at sequence length S, per query token: `causal=True` averages the keys a query sees over the
  positions of a causal sequence, sum_{t=1..S} t / S = (S + 1) / 2 keys (the work a causal kernel that
  skips masked blocks does, up to block granularity); `causal=False` counts all S keys (what a masked
  dense implementation computes, and what XLA counts for it).
- MoE layers count the K routed experts a token is sent to (`num_experts_per_tok`), the shared experts
  and the router matmul (D x E); dispatch, combine and the routing weights are elementwise.
- MTP depth k (k = 1..num_nextn_predict_layers) counts, per token: eh_proj (2D -> D), one transformer
  block (MLA + an MoE FFN, or a dense one when the model has no routed experts) and the shared lm_head.
  Every token position is counted, including the last k that have no target.
- Training = forward + backward, the backward being twice the forward (one product for the input
  gradient and one for the weight gradient per forward product), so 3x forward.  With activation
  checkpointing the recomputed products are reported separately (hardware FLOPs); MFU uses the model
  FLOPs without them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepseek_jax.config import REMAT_POLICIES, ModelConfig

# Element widths of the usual cache dtypes.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "float8_e4m3fn": 1}


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
  """Forward FLOPs per token by component, summed over the layers (and MTP depths) that have it.

  Attributes:
    mla_projections: q (q_a_proj + q_b_proj, or q_proj), kv_a_proj_with_mqa, kv_b_proj and o_proj of the
      main layers.
    attention_scores: q . k over H heads of width Dn + Dr, main layers.
    attention_values: softmax(scores) . v over H heads of width Dv, main layers.
    dense_mlp: the SwiGLU MLPs of the first_k_dense_replace (and other non-MoE) layers.
    routed_experts: the K routed experts of every MoE layer.
    shared_experts: the shared experts of every MoE layer.
    router: the gate matmul D -> E of every MoE layer.
    head: lm_head D -> V of the main model.
    mtp: all MTP depths together (eh_proj + block + shared head); `mtp_parts` splits it.
    mtp_parts: dict with eh_proj, block, head for the MTP modules (summed over depths).
  """
  mla_projections: float = 0.0
  attention_scores: float = 0.0
  attention_values: float = 0.0
  dense_mlp: float = 0.0
  routed_experts: float = 0.0
  shared_experts: float = 0.0
  router: float = 0.0
  head: float = 0.0
  mtp: float = 0.0
  mtp_parts: dict = dataclasses.field(default_factory=dict)

  @property
  def attention(self) -> float:
    """Scores + values of the main layers."""
    return self.attention_scores + self.attention_values

  @property
  def main(self) -> float:
    """The main model alone (no MTP)."""
    return (self.mla_projections + self.attention + self.dense_mlp + self.routed_experts
            + self.shared_experts + self.router + self.head)

  @property
  def total(self) -> float:
    """Main model + MTP."""
    return self.main + self.mtp

  def as_dict(self) -> dict:
    """Components, `attention`, `main` and `total` as a flat dict of floats."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mtp_parts"}
    d.update({f"mtp_{k}": v for k, v in self.mtp_parts.items()})
    d.update(attention=self.attention, main=self.main, total=self.total)
    return d


@dataclasses.dataclass(frozen=True)
class TrainFlops:
  """Training FLOPs per token.

  Attributes:
    forward: forward FLOPs per token (main + MTP when included).
    backward: 2 x forward.
    recompute: products rerun by activation checkpointing (0 without it).
  """
  forward: float
  backward: float
  recompute: float = 0.0

  @property
  def model(self) -> float:
    """Model FLOPs (forward + backward, 3x forward): the numerator of MFU."""
    return self.forward + self.backward

  @property
  def hardware(self) -> float:
    """FLOPs the device executes, recomputation included (the numerator of HFU)."""
    return self.model + self.recompute


# ------------------------------------------------------------------ per-layer pieces


def mla_projection_flops(cfg: ModelConfig) -> int:
  """FLOPs per token of one layer's MLA projections (q path, kv_a, kv_b, o_proj).

  Args:
    cfg: the model.

  Returns:
    2 x (D Dq + Dq H (Dn+Dr)) [or 2 D H (Dn+Dr) without q_lora_rank] + 2 D (Dc+Dr) + 2 Dc H (Dn+Dv)
    + 2 H Dv D.
  """
  d, h = cfg.hidden_size, cfg.num_attention_heads
  dqk = cfg.qk_head_dim
  if cfg.q_lora_rank is None:
    q = 2 * d * h * dqk
  else:
    q = 2 * d * cfg.q_lora_rank + 2 * cfg.q_lora_rank * h * dqk
  kv_a = 2 * d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  kv_b = 2 * cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  o = 2 * h * cfg.v_head_dim * d
  return q + kv_a + kv_b + o


def attended_keys(seq_len: int, causal: bool = True) -> float:
  """Keys one query attends to, on average over a sequence of `seq_len` tokens.

  Args:
    seq_len: S.
    causal: True: (S + 1) / 2 (causal average); False: S (full).

  Returns:
    The mean number of keys per query.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len!r} must be positive")
  return (seq_len + 1) / 2 if causal else float(seq_len)


def attention_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> tuple[float, float]:
  """(scores, values) FLOPs per token of one layer's attention core.

  Args:
    cfg: the model.
    seq_len: S.
    causal: causal average (True) or all S keys (False); see `attended_keys`.

  Returns:
    (2 H (Dn+Dr) keys, 2 H Dv keys).
  """
  keys = attended_keys(seq_len, causal)
  h = cfg.num_attention_heads
  return 2 * h * cfg.qk_head_dim * keys, 2 * h * cfg.v_head_dim * keys


def swiglu_flops(hidden: int, width: int) -> int:
  """FLOPs per token of a SwiGLU MLP (gate, up: hidden -> width; down: width -> hidden)."""
  return 3 * 2 * hidden * width


def is_moe_block(cfg: ModelConfig, layer: int) -> bool:
  """Whether block `layer` has an MoE FFN; indices >= num_hidden_layers are the MTP blocks, which are MoE
  whenever the model has routed experts."""
  if layer >= cfg.num_hidden_layers:
    return cfg.n_routed_experts is not None
  return cfg.is_moe_layer(layer)


def ffn_flops(cfg: ModelConfig, layer: int) -> dict:
  """FLOPs per token of the FFN of block `layer` (MTP blocks continue the numbering after the main ones).

  Args:
    cfg: the model.
    layer: 0-based block index; num_hidden_layers + k - 1 is MTP depth k.

  Returns:
    dict with dense_mlp, routed_experts, shared_experts, router (zeros where absent).
  """
  d = cfg.hidden_size
  out = dict(dense_mlp=0, routed_experts=0, shared_experts=0, router=0)
  if is_moe_block(cfg, layer):
    f = cfg.moe_intermediate_size
    out["routed_experts"] = cfg.num_experts_per_tok * swiglu_flops(d, f)
    out["shared_experts"] = swiglu_flops(d, cfg.n_shared_experts * f)
    out["router"] = 2 * d * cfg.n_routed_experts
  else:
    out["dense_mlp"] = swiglu_flops(d, cfg.intermediate_size)
  return out


def head_flops(cfg: ModelConfig) -> int:
  """FLOPs per token of lm_head (D -> V)."""
  return 2 * cfg.hidden_size * cfg.vocab_size


def mtp_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict:
  """FLOPs per token of all MTP depths.

  Args:
    cfg: the model.
    seq_len: S.
    causal: attention convention, see `attended_keys`.

  Returns:
    dict with eh_proj, block (MLA + attention + FFN), head, each summed over the depths.
  """
  d = cfg.hidden_size
  out = dict(eh_proj=0.0, block=0.0, head=0.0)
  for k in range(cfg.num_nextn_predict_layers):
    layer = cfg.num_hidden_layers + k
    out["eh_proj"] += 2 * (2 * d) * d
    out["block"] += (mla_projection_flops(cfg) + sum(attention_flops(cfg, seq_len, causal))
                     + sum(ffn_flops(cfg, layer).values()))
    out["head"] += head_flops(cfg)
  return out


# ------------------------------------------------------------------ whole model


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                            include_mtp: bool = True) -> FlopsBreakdown:
  """Forward FLOPs per token by component.

  Args:
    cfg: the model.
    seq_len: sequence length S the attention sees.
    causal: True: causal-average attention ((S+1)/2 keys per query); False: full (S keys).
    include_mtp: count the MTP modules (training runs them; plain inference does not).

  Returns:
    A `FlopsBreakdown`.
  """
  n = cfg.num_hidden_layers
  scores, values = attention_flops(cfg, seq_len, causal)
  ffn = dict(dense_mlp=0, routed_experts=0, shared_experts=0, router=0)
  for i in range(n):
    for k, v in ffn_flops(cfg, i).items():
      ffn[k] += v
  mtp = mtp_flops(cfg, seq_len, causal) if include_mtp else dict(eh_proj=0.0, block=0.0, head=0.0)
  return FlopsBreakdown(
      mla_projections=float(n * mla_projection_flops(cfg)),
      attention_scores=n * scores, attention_values=n * values,
      dense_mlp=float(ffn["dense_mlp"]), routed_experts=float(ffn["routed_experts"]),
      shared_experts=float(ffn["shared_experts"]), router=float(ffn["router"]),
      head=float(head_flops(cfg)), mtp=float(sum(mtp.values())), mtp_parts=mtp)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, *, remat_policy: Optional[str] = None,
                              causal: bool = True, moe_impl: Optional[str] = None) -> float:
  """Products rerun in the backward pass by activation checkpointing.

  The model checkpoints each main-model decoder block (`layers.transformer.remat_block`); the embedding,
  the final norm and head, and the MTP modules are not checkpointed.  JAX reruns only what the backward
  needs, so per policy:
  - "full": the block's forward except its last products whose outputs only feed the residual sum
    (down_proj of the dense MLP, or of the shared experts; the routed experts' down_proj is rerun because
    the gate-weight gradient needs it).
  - "dots": every dot_general output is saved, so only the routed experts rerun, and only when they are
    grouped matmuls (`ragged_dot` or the Pallas kernel, which the policy does not save); the "dense"
    MoE path reruns nothing.
  - "dots_with_no_batch_dims": as "dots", plus the attention scores and values (their products carry the
    batch and head dimensions).  The "dense" MoE path also reruns its batched down projection and combine;
    those are counted here at the model's K experts (that path computes all E).
  - "none": nothing.

  Args:
    cfg: the model.
    seq_len: S.
    remat_policy: one of REMAT_POLICIES; None takes cfg.remat_policy.
    causal: attention convention.
    moe_impl: the MoE implementation; None takes cfg.moe_impl ("auto" means grouped matmuls).

  Returns:
    FLOPs per token.
  """
  policy = cfg.remat_policy if remat_policy is None else remat_policy
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}: expected one of {REMAT_POLICIES}")
  impl = cfg.moe_impl if moe_impl is None else moe_impl
  grouped = impl != "dense"
  d = cfg.hidden_size
  total = 0.0
  for i in range(cfg.num_hidden_layers):
    ffn = ffn_flops(cfg, i)
    attn = sum(attention_flops(cfg, seq_len, causal))
    if policy == "full":
      if is_moe_block(cfg, i):
        residual_only = 2 * d * cfg.n_shared_experts * cfg.moe_intermediate_size
      else:
        residual_only = 2 * d * cfg.intermediate_size
      total += mla_projection_flops(cfg) + attn + sum(ffn.values()) - residual_only
    elif policy in ("dots", "dots_with_no_batch_dims"):
      if grouped:
        total += ffn["routed_experts"]
      if policy == "dots_with_no_batch_dims":
        total += attn
        if not grouped and is_moe_block(cfg, i):
          total += ffn["routed_experts"] / 3 + 2 * d * cfg.num_experts_per_tok
  return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                          remat_policy: Optional[str] = None, include_mtp: bool = True) -> TrainFlops:
  """Training FLOPs per token: forward, backward (2x forward) and checkpoint recomputation.

  Args:
    cfg: the model.
    seq_len: S.
    causal: attention convention (see `attended_keys`).
    remat_policy: activation checkpointing; None takes cfg.remat_policy ("none" by default); see
      `recompute_flops_per_token`.
    include_mtp: count the MTP modules (DeepSeek-V3 trains with them).

  Returns:
    A `TrainFlops`; `.model` is 3x forward, `.hardware` adds the recomputation.
  """
  fwd = forward_flops_per_token(cfg, seq_len, causal=causal, include_mtp=include_mtp).total
  rec = recompute_flops_per_token(cfg, seq_len, remat_policy=remat_policy, causal=causal)
  return TrainFlops(forward=fwd, backward=2 * fwd, recompute=rec)


def decode_flops_per_token(cfg: ModelConfig, context_len: int, *, absorbed: bool = True) -> dict:
  """FLOPs of generating one token against a cache of `context_len` positions (the new one included).

  Absorbed MLA (the DeepSeek decode): the key half of kv_b is folded into the query
  (q_nope H x Dn -> H x Dc), scores run over the cached latent [c_kv | k_pe] (Dc + Dr per position, shared
  by all heads), values are the latent itself (Dc per head), and the value half of kv_b is applied after
  attention (H x Dc -> H x Dv).  Not absorbed: kv_b runs on the new token only and the attention reads an
  expanded per-head K/V cache, as MHA does.

  Args:
    cfg: the model.
    context_len: T, keys the new token attends to.
    absorbed: absorbed (True) or expanded-cache (False) decode.

  Returns:
    dict with projections, attention, ffn (dense + experts + router), head and total, per token.
  """
  if context_len <= 0:
    raise ValueError(f"context_len={context_len!r} must be positive")
  d, h, t = cfg.hidden_size, cfg.num_attention_heads, context_len
  dc, dr, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
  if cfg.q_lora_rank is None:
    q = 2 * d * h * (dn + dr)
  else:
    q = 2 * d * cfg.q_lora_rank + 2 * cfg.q_lora_rank * h * (dn + dr)
  kv_a = 2 * d * (dc + dr)
  o = 2 * h * dv * d
  if absorbed:
    proj = q + kv_a + 2 * h * dn * dc + 2 * h * dc * dv + o
    attn = 2 * h * (dc + dr) * t + 2 * h * dc * t
  else:
    proj = q + kv_a + 2 * dc * h * (dn + dv) + o
    attn = 2 * h * (dn + dr) * t + 2 * h * dv * t
  n = cfg.num_hidden_layers
  ffn = sum(sum(ffn_flops(cfg, i).values()) for i in range(n))
  out = dict(projections=float(n * proj), attention=float(n * attn), ffn=float(ffn),
             head=float(head_flops(cfg)))
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------ KV cache


def kv_cache_elements_per_token(cfg: ModelConfig, kind: str = "mla", *,
                                num_kv_heads: Optional[int] = None, include_mtp: bool = False) -> int:
  """Cached elements per token, summed over layers.

  Args:
    cfg: the model.
    kind: "mla": the latent c_kv + the shared k_pe, (Dc + Dr) per layer (what DeepSeek caches);
      "mha": full per-head keys (Dn + Dr) and values (Dv), H (Dn + Dr + Dv) per layer;
      "gqa": the same with `num_kv_heads` key/value heads; "mqa": one key/value head.
    num_kv_heads: key/value heads for "gqa".
    include_mtp: also cache the MTP blocks' attention (speculative decoding runs them); the
      DeepSeek figures leave them out.

  Returns:
    Elements per token.
  """
  if kind == "mla":
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  else:
    if kind == "mha":
      g = cfg.num_attention_heads
    elif kind == "mqa":
      g = 1
    elif kind == "gqa":
      if num_kv_heads is None or not 0 < num_kv_heads <= cfg.num_attention_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads!r} must be in [1, num_attention_heads="
                         f"{cfg.num_attention_heads}] for kind='gqa'")
      if cfg.num_attention_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_attention_heads="
                         f"{cfg.num_attention_heads}")
      g = num_kv_heads
    else:
      raise ValueError(f"kind={kind!r}: expected one of mla, mha, gqa, mqa")
    per_layer = g * (cfg.qk_head_dim + cfg.v_head_dim)
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
  return per_layer * layers


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", *, dtype: str = "bfloat16",
                             num_kv_heads: Optional[int] = None, include_mtp: bool = False) -> int:
  """Cache bytes per token: `kv_cache_elements_per_token` x the element width of `dtype`.

  Args:
    cfg: the model.
    kind: mla | mha | gqa | mqa (see `kv_cache_elements_per_token`).
    dtype: a key of DTYPE_BYTES (bfloat16 by default).
    num_kv_heads: for "gqa".
    include_mtp: also the MTP blocks' cache.

  Returns:
    Bytes per token (V3, mla, bfloat16: 70,272).
  """
  if dtype not in DTYPE_BYTES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
  return DTYPE_BYTES[dtype] * kv_cache_elements_per_token(cfg, kind, num_kv_heads=num_kv_heads,
                                                          include_mtp=include_mtp)
