"""Model configuration: one frozen dataclass whose fields are the HF `config.json` names.

`ModelConfig` describes every DeepSeek-V2 / V2-Lite / V3 / R1 model.  It is validated on construction
(`__post_init__` raises a `ValueError` naming the field and the value), hashable (so it can be a static
argument of `jax.jit`), and maps 1:1 to a released `config.json` through `from_hf` / `to_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import stat
from typing import Any, Mapping, Optional

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
IMPLS = ("auto", "xla", "host", "pallas")
DECODE_IMPLS = ("auto", "xla", "pallas")
MOE_IMPLS = ("auto", "dense", "host", "blocked", "xla", "pallas", "tokamax")
MATMUL_IMPLS = ("auto", "xla", "host")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp8")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# Fields of ModelConfig that are implementation choices, not part of an HF config.json.
NON_HF_FIELDS = frozenset({"dtype", "param_dtype", "precision", "fp8_weights", "fp8_weight_block",
                           "attention_impl", "decode_impl", "moe_impl", "matmul_impl", "pallas_interpret",
                           "remat_policy", "scan_layers", "moe_capacity_factor"})
# Upper bounds on the sizes a config.json may declare (`from_hf`): far above every released DeepSeek model
# (V3: 61 layers, width 7168, vocabulary 129280, 256 experts), low enough that a hostile file cannot make the
# loader build name tables or shapes of absurd size.
HF_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20, "num_hidden_layers": 1024, "num_attention_heads": 1024,
    "q_lora_rank": 1 << 16, "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 4096, "qk_rope_head_dim": 4096,
    "v_head_dim": 4096, "n_routed_experts": 4096, "n_shared_experts": 64, "num_experts_per_tok": 4096,
    "n_group": 4096, "topk_group": 4096, "moe_layer_freq": 1024, "first_k_dense_replace": 1024,
    "num_nextn_predict_layers": 64, "max_position_embeddings": 1 << 24,
}
MAX_CONFIG_BYTES = 10_000_000  # a released config.json is about 2 KB


def _short(value, limit: int = 60) -> str:
  r = repr(value)
  return r if len(r) <= limit else r[:limit] + "..."


def _check_field_types(obj, prefix: str = ""):
  """ValueError naming the first field whose value is not of its annotated type (int, float, bool, str,
  Optional[...] of those); floats must be finite."""
  for f in dataclasses.fields(obj):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    optional = t.startswith("Optional[")
    base = t[len("Optional["):-1] if optional else t
    v = getattr(obj, f.name)
    if v is None and optional:
      continue
    if base == "bool":
      ok, what = isinstance(v, bool), "a bool"
    elif base == "int":
      ok, what = isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"
    elif base == "float":
      ok, what = isinstance(v, numbers.Real) and not isinstance(v, bool), "a finite number"
      if ok:
        try:
          ok = math.isfinite(v)
        except OverflowError:
          ok = False
    elif base == "str":
      ok, what = isinstance(v, str), "a string"
    else:
      continue
    if not ok:
      raise ValueError(f"{prefix}{f.name}={_short(v)} must be {what}" + (" or null" if optional else ""))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN rope scaling (the `rope_scaling` / `rope_parameters` entry of an HF config).

  Attributes:
    type: only "yarn" is used by DeepSeek models.
    factor: context extension factor s (V3: 40).
    original_max_position_embeddings: the pre-extension window (V3: 4096).
    beta_fast: YaRN's alpha/beta high rotation bound (32).
    beta_slow: low rotation bound (1).
    mscale: attention-temperature coefficient applied to cos/sin (as a ratio with mscale_all_dim).
    mscale_all_dim: coefficient of the softmax-scale correction m = 0.1 * mscale_all_dim * ln(s) + 1.
  """
  type: str = "yarn"
  factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0

  def __post_init__(self):
    _check_field_types(self, "rope_scaling.")
    if self.type != "yarn":
      raise ValueError(f"rope_scaling.type={self.type!r}: only 'yarn' is supported")
    if not self.factor >= 1.0:
      raise ValueError(f"rope_scaling.factor={self.factor!r} must be >= 1")
    if self.original_max_position_embeddings <= 0:
      raise ValueError("rope_scaling.original_max_position_embeddings="
                       f"{self.original_max_position_embeddings!r} must be positive")
    if not self.beta_fast > self.beta_slow > 0:
      raise ValueError(f"rope_scaling.beta_fast={self.beta_fast!r} must exceed "
                       f"rope_scaling.beta_slow={self.beta_slow!r} > 0")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RopeScaling":
    d = dict(d)
    kind = d.pop("type", d.pop("rope_type", "yarn"))
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    return cls(type=kind, **kwargs)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature m = 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
  return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A DeepSeek-V2/V3 model.  Field names are those of the HF `config.json`."""

  # --- vocabulary and trunk ---
  vocab_size: int = 129280                # V: token vocabulary
  hidden_size: int = 7168                 # D: model width
  intermediate_size: int = 18432          # hidden width of the dense SwiGLU layers
  num_hidden_layers: int = 61             # transformer blocks of the main model
  rms_norm_eps: float = 1e-6              # RMSNorm epsilon
  tie_word_embeddings: bool = False       # share embed_tokens with lm_head
  initializer_range: float = 0.006        # std of the normal init (V3 report: 0.006)
  bos_token_id: Optional[int] = 0
  eos_token_id: Optional[int] = 1

  # --- mla: Multi-head Latent Attention ---
  num_attention_heads: int = 128          # H
  q_lora_rank: Optional[int] = 1536       # Dq: query compression rank; None = plain q_proj (V2-Lite)
  kv_lora_rank: int = 512                 # Dc: latent KV rank (what the cache stores, with k_pe)
  qk_nope_head_dim: int = 128             # Dn: per-head query/key width without rope
  qk_rope_head_dim: int = 64              # Dr: decoupled rope width (one k_pe shared by all heads)
  v_head_dim: int = 128                   # Dv: per-head value width
  attention_bias: bool = False            # DeepSeek uses no attention biases; only False is supported

  # --- moe: DeepSeekMoE ---
  n_routed_experts: Optional[int] = 256   # E; None = all layers dense
  n_shared_experts: int = 1               # shared experts (one MLP of n_shared x moe_intermediate_size)
  num_experts_per_tok: int = 8            # K: routed experts per token
  moe_intermediate_size: int = 2048       # F: hidden width of one expert
  first_k_dense_replace: int = 3          # the first k layers use a dense MLP
  moe_layer_freq: int = 1                 # every moe_layer_freq-th layer after those is MoE
  n_group: int = 8                        # G: expert groups for group-limited routing
  topk_group: int = 4                     # groups kept per token
  topk_method: str = "noaux_tc"           # greedy | group_limited_greedy | noaux_tc
  scoring_func: str = "sigmoid"           # softmax (V2) | sigmoid (V3)
  norm_topk_prob: bool = True             # normalize the K gate weights to sum 1
  routed_scaling_factor: float = 2.5      # multiplies the routed experts' output weights
  aux_loss_alpha: float = 0.0001          # sequence-wise balance loss weight (report section 4.2)
  seq_aux: bool = True                    # balance loss computed per sequence

  # --- rope + yarn ---
  max_position_embeddings: int = 163840
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = dataclasses.field(default_factory=RopeScaling)

  # --- mtp: Multi-Token Prediction ---
  num_nextn_predict_layers: int = 1       # D: MTP depth (0 = none)

  # --- numerics ---
  dtype: str = "float32"                  # compute dtype of activations and matmuls
  param_dtype: str = "float32"            # storage dtype of parameters
  precision: str = "fp32"                 # matmul recipe: fp32 | bf16 | fp8 (blockwise-scaled E4M3)
  fp8_weights: bool = False               # store the linear and routed-expert weights of the released FP8 set
                                          # as float8_e4m3fn + float32 `*_scale_inv` per block (inference);
                                          # the forward dequantizes them, or with precision='fp8' runs the
                                          # FP8 GEMM on the stored codes (deepseek_jax.layers.fp8_weights)
  fp8_weight_block: int = 128             # square block of those scales (the release: 128 x 128)

  # --- implementation choices (never change the math; 'auto' is resolved by deepseek_jax.ops.impls) ---
  attention_impl: str = "auto"            # auto | xla (jnp; chunked causal attention) | pallas
                                          # (kernels.mla_attention) | host (opt-in CPU float32 FFI call
                                          # over BLAS, kernels.host_attention)
  decode_impl: str = "auto"               # absorbed attention over the cache: auto | xla | pallas
                                          # (kernels.mla_decode)
  moe_impl: str = "auto"                  # auto | dense (every expert on every token) | blocked (sort, pad
                                          # groups to blocks, batched matmul) | xla (sort +
                                          # jax.lax.ragged_dot) | pallas (sort + kernels.grouped_matmul)
                                          # | tokamax (sort + tokamax.ragged_dot; optional package)
                                          # | host (opt-in CPU float32 FFI call, kernels.host_moe)
  matmul_impl: str = "auto"               # the projections' matmuls: auto | xla (jnp.dot) | host (opt-in
                                          # CPU float32 FFI call with its VJP, kernels.host_matmul)
  pallas_interpret: Optional[bool] = None  # Pallas kernels in interpret mode (None: on CPU only)
  moe_capacity_factor: Optional[float] = None  # expert-parallel dispatch only (an 'expert' mesh axis > 1):
                                          # rows each device may send each other device per MoE layer, as a
                                          # multiple of the balanced share T_local x K / ep; rows past it are
                                          # dropped. None: dropless, buffers sized for the worst case
                                          # ep x T_local x min(K, E / ep) rows (ops.expert_parallel)
  remat_policy: str = "none"              # activation checkpointing of each block (jax.checkpoint policy)
  scan_layers: bool = False               # each run of identical blocks as one nn.scan: parameters stacked
                                          # [layers, ...] under 'layers_{a}_to_{b}' (model.layer_runs), one
                                          # block compiled per run (model.to_layer_layout converts)

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"rope_scaling={_short(self.rope_scaling)} must be an object or null")
    if self.q_lora_rank == 0:
      object.__setattr__(self, "q_lora_rank", None)
    _check_field_types(self)
    positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "max_position_embeddings", "moe_layer_freq"]
    if self.q_lora_rank is not None:
      positive.append("q_lora_rank")
    if self.n_routed_experts is not None:
      positive += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                   "topk_group"]
    for name in positive:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive integer")
    for name in ["n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]:
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}={v!r} must be a non-negative integer")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rope rotates pairs)")
    if self.rms_norm_eps <= 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be positive")
    if self.rope_theta <= 0:
      raise ValueError(f"rope_theta={self.rope_theta!r} must be positive")
    if self.initializer_range <= 0:
      raise ValueError(f"initializer_range={self.initializer_range!r} must be positive")
    if self.attention_bias:
      raise ValueError("attention_bias=True is not supported (no DeepSeek model uses it)")
    if self.n_routed_experts is not None:
      e = self.n_routed_experts
      if self.num_experts_per_tok > e:
        raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                         f"n_routed_experts={e}")
      if e % self.n_group:
        raise ValueError(f"n_routed_experts={e} is not divisible by n_group={self.n_group}")
      if self.topk_group > self.n_group:
        raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
      if self.scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func={self.scoring_func!r}: expected one of {SCORING_FUNCS}")
      if self.topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method={self.topk_method!r}: expected one of {TOPK_METHODS}")
      if self.topk_method != "greedy":
        per_group = e // self.n_group
        kept = self.topk_group * per_group
        if self.num_experts_per_tok > kept:
          raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                           f"{kept} experts in topk_group={self.topk_group} groups of {per_group}")
        if self.topk_method == "noaux_tc" and per_group < 2:
          raise ValueError(f"topk_method='noaux_tc' scores groups by their top-2 experts, but "
                           f"n_routed_experts/n_group={per_group} < 2")
      if self.routed_scaling_factor <= 0:
        raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor!r} must be positive")
    if self.first_k_dense_replace > self.num_hidden_layers:
      raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} exceeds "
                       f"num_hidden_layers={self.num_hidden_layers}")
    cf = self.moe_capacity_factor
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf < math.inf):
      raise ValueError(f"moe_capacity_factor={cf!r} must be a positive finite number or None")
    for name in ["fp8_weights", "scan_layers"]:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
    if self.pallas_interpret is not None and not isinstance(self.pallas_interpret, bool):
      raise ValueError(f"pallas_interpret={self.pallas_interpret!r} must be a bool or None")
    if (not isinstance(self.fp8_weight_block, int) or isinstance(self.fp8_weight_block, bool)
        or self.fp8_weight_block <= 0):
      raise ValueError(f"fp8_weight_block={self.fp8_weight_block!r} must be a positive integer")
    if self.fp8_weights and self.precision == "fp8" and self.fp8_weight_block % 128:
      raise ValueError(f"fp8_weight_block={self.fp8_weight_block} must be a multiple of 128 (the activation "
                       "tile) for precision='fp8' with fp8_weights=True")
    for name, allowed in [("dtype", DTYPES), ("param_dtype", DTYPES), ("precision", PRECISIONS),
                          ("attention_impl", IMPLS), ("decode_impl", DECODE_IMPLS), ("moe_impl", MOE_IMPLS),
                          ("matmul_impl", MATMUL_IMPLS),
                          ("remat_policy", REMAT_POLICIES)]:
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
    for name in ["bos_token_id", "eos_token_id"]:
      v = getattr(self, name)
      if v is not None and not 0 <= v < self.vocab_size:
        raise ValueError(f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")

  # ---------------------------------------------------------------- derived quantities
  @property
  def qk_head_dim(self) -> int:
    """Per-head query/key width: qk_nope_head_dim + qk_rope_head_dim."""
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times m^2 with YaRN (m from rope_scaling.mscale_all_dim)."""
    scale = self.qk_head_dim ** -0.5
    rs = self.rope_scaling
    if rs is not None and rs.mscale_all_dim:
      m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
      scale = scale * m * m
    return scale

  def is_moe_layer(self, i: int) -> bool:
    """Whether main-model layer i uses DeepSeekMoE (else a dense SwiGLU MLP)."""
    return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0)

  @property
  def num_moe_layers(self) -> int:
    """MoE layers of the main model (MTP blocks not included)."""
    return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  @property
  def has_router_bias(self) -> bool:
    """noaux_tc routing keeps an e_score_correction_bias per expert (non-trained state)."""
    return self.n_routed_experts is not None and self.topk_method == "noaux_tc"

  def replace(self, **changes) -> "ModelConfig":
    """A copy with fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- presets
  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    """A named configuration: deepseek-v3 (also R1), deepseek-v2, deepseek-v2-lite, tiny, small."""
    if name not in PRESETS:
      raise ValueError(f"preset {name!r} is unknown; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  # ---------------------------------------------------------------- HF config.json
  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
    """Reads an HF `config.json` (a path to the file or its directory, or the parsed dict).

    Accepts the released layout (`rope_scaling`, `num_nextn_predict_layers`) and the one transformers 5
    writes (`rope_parameters`, `num_mtp_layers`).  Unknown keys are ignored; fields absent from the file
    take the HF defaults of the model type.  The file is untrusted input: every value is type-checked
    (floats finite) and the sizes are bounded by `HF_LIMITS`; any problem is one ValueError line naming the
    file and the field.
    """
    if isinstance(source, Mapping):
      return cls._from_hf_dict(source, overrides)
    path = os.fspath(source)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    d = _read_json_file(path)
    try:
      return cls._from_hf_dict(d, overrides)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  @classmethod
  def _from_hf_dict(cls, source, overrides: Mapping[str, Any]) -> "ModelConfig":
    """`from_hf` of a parsed config.json: every value type-checked, sizes within HF_LIMITS."""
    if not isinstance(source, Mapping):
      raise ValueError(f"the config is a {type(source).__name__}, not an object")
    d = dict(source)
    model_type = d.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
      raise ValueError(f"model_type={_short(model_type)} is not supported (expected deepseek_v3 or "
                       "deepseek_v2)")
    if model_type == "deepseek_v2":
      base = dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                  routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                  initializer_range=0.02, aux_loss_alpha=0.001, first_k_dense_replace=0,
                  n_shared_experts=0, rope_scaling=None)
    else:
      base = dict(initializer_range=0.02, rope_scaling=None, num_nextn_predict_layers=0)
    # Rope: released `rope_scaling`, transformers 5 `rope_parameters` (which also carries rope_theta).
    rope = d.get("rope_scaling")
    params = d.get("rope_parameters")
    for name, v in (("rope_scaling", rope), ("rope_parameters", params)):
      if v is not None and not isinstance(v, Mapping):
        raise ValueError(f"{name}={_short(v)} must be an object or null")
    if isinstance(params, Mapping):
      if "rope_theta" in params and "rope_theta" not in d:
        d["rope_theta"] = params["rope_theta"]
      if rope is None and params.get("rope_type", params.get("type", "default")) == "yarn":
        rope = params
    if isinstance(rope, Mapping) and rope.get("type", rope.get("rope_type")) not in ("yarn",):
      rope = None
    d["rope_scaling"] = None if rope is None else RopeScaling.from_dict(rope)
    if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
      d["num_nextn_predict_layers"] = d["num_mtp_layers"]
    if d.get("n_group") is None:
      d.pop("n_group", None)
    if d.get("topk_group") is None:
      d.pop("topk_group", None)
    for k in ("bos_token_id", "eos_token_id"):
      if isinstance(d.get(k), list):
        if not d[k]:
          raise ValueError(f"{k}=[] must be a token id, a list of them, or null")
        d[k] = d[k][0]
    # Only HF fields: transformers writes "dtype" (its storage dtype), which is not our compute dtype.
    known = {f.name for f in dataclasses.fields(cls)} - NON_HF_FIELDS
    kwargs = dict(base)
    kwargs.update({k: v for k, v in d.items() if k in known})
    for name, limit in HF_LIMITS.items():  # before construction: a huge value is refused, never used
      v = kwargs.get(name)
      if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > limit:
        raise ValueError(f"{name}={_short(v)} exceeds the largest value a checkpoint may declare ({limit}; "
                         "deepseek_jax.config.HF_LIMITS)")
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The released `config.json` layout (model_type deepseek_v3, `rope_scaling`,
    `num_nextn_predict_layers`), readable by transformers and by `from_hf`."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NON_HF_FIELDS}
    d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
    # Softmax routing without the bias is DeepSeek-V2's gate; transformers picks the gate by model_type.
    v2 = self.scoring_func == "softmax" and self.topk_method != "noaux_tc"
    d.update(model_type="deepseek_v2" if v2 else "deepseek_v3",
             architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
             hidden_act="silu", num_key_value_heads=self.num_attention_heads, torch_dtype="float32",
             rope_interleave=True)
    return d


def _read_json_file(path: str):
  """A config.json's parsed JSON: refused with one ValueError line naming the file unless it is a regular
  file of at most MAX_CONFIG_BYTES of UTF-8 JSON (checked with stat first: a FIFO is never opened)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"no config.json at {path}") from None
  if not stat.S_ISREG(st.st_mode):
    kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
    raise ValueError(f"{path} is {kind}, not a regular file; refused")
  if st.st_size > MAX_CONFIG_BYTES:
    raise ValueError(f"{path}: {st.st_size} bytes, more than a config.json may have ({MAX_CONFIG_BYTES})")
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    raise ValueError(f"{path}: cannot open ({e.strerror})") from None
  with os.fdopen(fd, "rb") as f:
    raw = f.read(st.st_size + 1)  # read(n) allocates n bytes up front: ask for what the file holds
  if len(raw) > MAX_CONFIG_BYTES:
    raise ValueError(f"{path}: more bytes than a config.json may have ({MAX_CONFIG_BYTES})")
  try:
    return json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except RecursionError:
    raise ValueError(f"{path}: JSON nested too deeply") from None
  except ValueError as e:  # e.g. an integer of more digits than Python converts
    raise ValueError(f"{path}: not valid JSON ({e})") from None


TINY = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    moe_intermediate_size=32, first_k_dense_replace=1, n_group=4, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=1024, rope_theta=10000.0,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256, beta_fast=32.0,
                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    num_nextn_predict_layers=1, initializer_range=0.02)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-v3": ModelConfig(),
    "deepseek-r1": ModelConfig(),
    "deepseek-v2": ModelConfig(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, q_lora_rank=1536,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=16.0, aux_loss_alpha=0.003,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096,
                                 beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096,
                                 beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
    "tiny": TINY,
    # About 100M parameters for one GPU: every V3 feature at a width a single device trains quickly.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=4, moe_intermediate_size=256, first_k_dense_replace=1, n_group=4,
        topk_group=2, max_position_embeddings=8192,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=2048),
        num_nextn_predict_layers=1, initializer_range=0.02),
}
