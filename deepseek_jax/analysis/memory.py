"""Per-device memory of a training run from shapes and shardings alone (nothing is allocated).

Parameters come from `jax.eval_shape` of the model's init with their logical axis names; each array's
per-device shard follows from the rules table of `deepseek_jax.sharding` on a mesh given by its axis sizes
(a dim is split over its mesh axes only when their product divides it, as `sharding.fit_spec` does).

  parameters   sum over arrays of prod(ceil(dim / shards)) x bytes(param_dtype)
  gradients    the same shards, in param_dtype (the train step's gradients have the parameters' dtype)
  optimizer    AdamW mu + nu in opt_dtype on the parameters' shards, further split over `zero1_axes`
               (ZeRO-1), plus an fp32 master copy when param_dtype is not float32 (report section 3.3)
  activations  an estimate, below

Activation estimate. With T_l = batch x seq_len / (product of the token-sharding axes, the 'activation_batch'
rule's mesh axes), t = the tensor axis, a = bytes(compute dtype), per token and layer the arrays the backward
pass keeps are counted (elements; fp32 where the model computes in fp32):
  attention  none: x, norm(x), q_a, norm(q_a) [2 Dq], q and the concatenated q [2 H Dqk / t], kv_a [Dc + Dr],
             norm(c_kv) [Dc], k [H Dqk / t], v [H Dv / t], attention output [H Dv / t], o_proj output [D];
             scores: 2 H S / t fp32 (logits and probabilities) on the XLA path, H / t fp32 (log-sum-exp) with the
             flash kernel ('pallas')
  MoE        none: norm(x), router logits and scores [2E fp32], dispatched rows R [D], gate, up, silu x up
             [3 R F / t], expert outputs R [D], combined output [D], shared experts [3 F_s / t + D]; R = K rows
             per token on one device, and with expert parallelism the worst-case slot buffer
             ep x C / T_l = ep x min(K, E / ep) rows per token (dropless) or capacity_factor x K
  dense MLP  none: norm(x) [D], gate, up, silu x up [3 I / t], output [D]
  policies   'full': only each layer's input [D] is kept, plus one layer's 'none' set while it is recomputed;
             'dots': only dot_general outputs (projections, attention logits / values, router logits, shared
             and dense MLP dots); the grouped expert matmuls (ragged_dot / gmm) are not dot_general and are
             recomputed; 'dots_with_no_batch_dims': as 'dots' without the batched attention dots
  head       logits of the main model and each MTP depth: 2 x T_l x V / t fp32 (logits and their gradient)
Transient buffers of a single op (collective staging, the optimizer update) are not counted.
"""

from __future__ import annotations

import math
import types
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from deepseek_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def _bytes(dtype) -> int:
  return int(np.dtype(jnp.dtype(dtype)).itemsize)


def _rule(rules, name):
  for k, v in rules:
    if k == name:
      return () if v is None else ((v,) if isinstance(v, str) else tuple(v))
  return ()


def _shards(logical: Sequence, shape: Sequence[int], mesh_sizes: Mapping[str, int], rules) -> list[int]:
  """Devices each dim is split over: the rules' mesh axes, fitted to the shape by `sharding.fit_spec`."""
  from deepseek_jax.sharding import fit_spec  # pylint: disable=g-import-not-at-top
  entries = []
  for name in tuple(logical) + (None,) * (len(shape) - len(logical)):
    names = () if name is None else ((name,) if isinstance(name, str) else tuple(name))
    axes = tuple(a for n in names for a in _rule(rules, n))
    entries.append(axes or None)
  fitted = fit_spec(PartitionSpec(*entries), shape, types.SimpleNamespace(shape=dict(mesh_sizes)))
  out = []
  for axes in fitted:
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    out.append(math.prod(mesh_sizes.get(a, 1) for a in names))
  return out


def _leaf_shards(cfg: ModelConfig, mesh_sizes, rules):
  """[(path, shape, shards per dim)] for every variable of the model."""
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  from deepseek_jax.sharding import boxed_abstract_variables  # pylint: disable=g-import-not-at-top
  boxed = boxed_abstract_variables(DeepSeekV3(cfg), jnp.zeros((1, 1), jnp.int32))
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  out = []
  flat_specs = traverse_util.flatten_dict(jax.tree.map(lambda s: s, specs,
                                                       is_leaf=lambda x: isinstance(x, PartitionSpec)))
  flat_shapes = traverse_util.flatten_dict(shapes)
  for path, leaf in flat_shapes.items():
    spec = flat_specs[path]
    out.append((path, tuple(leaf.shape), _shards(tuple(spec), leaf.shape, mesh_sizes, rules)))
  return out


def _zero1_extra(shape, shards, mesh_sizes, axes) -> int:
  """Extra split of an optimizer-state copy over `axes` on its first whole, divisible dim (1 if none)."""
  size = math.prod(mesh_sizes.get(a, 1) for a in axes)
  if size <= 1:
    return 1
  for dim, s in zip(shape, shards):
    if s == 1 and dim % size == 0:
      return size
  return 1


def activation_elements_per_token(cfg: ModelConfig, *, seq_len: int, tensor: int = 1, expert: int = 1,
                                  remat_policy: str = "none", attention_impl: str = "xla",
                                  capacity_factor: Optional[float] = None) -> dict:
  """Saved activation elements per token for one attention, MoE and dense layer (module docstring).

  Returns:
    dict: attention, moe, dense (compute-dtype elements), attention_f32, moe_f32 (fp32 elements),
    input (the layer input, D) and rows_per_token (routed rows a device holds per token).
  """
  d, h, t = cfg.hidden_size, cfg.num_attention_heads, max(1, tensor)
  dqk, dv, dc, dr = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  dq = cfg.q_lora_rank or 0
  flash = attention_impl == "pallas"
  policy = remat_policy
  # attention
  proj_dots = (dq if dq else 0) + h * dqk / t + (dc + dr) + h * dqk / t + h * dv / t + d
  elementwise = d + d + (dq if dq else 0) + h * dqk / t + dc + h * dv / t
  scores_f32 = (h / t) if flash else 2 * h * seq_len / t
  score_dots_f32 = 0 if flash else h * seq_len / t
  # MoE
  e = cfg.n_routed_experts or 0
  k = cfg.num_experts_per_tok if e else 0
  if e and expert > 1:
    rows = expert * min(k, e // expert) if capacity_factor is None else capacity_factor * k
  else:
    rows = k
  f = cfg.moe_intermediate_size
  fs = cfg.moe_intermediate_size * cfg.n_shared_experts
  moe_all = d + rows * d + 3 * rows * f / t + rows * d + d + (3 * fs / t + d if fs else 0)
  moe_dots = (2 * fs / t + d) if fs else 0
  dense_all = d + 3 * cfg.intermediate_size / t + d
  dense_dots = 2 * cfg.intermediate_size / t + d
  if policy == "none":
    att, att32, moe, moe32, dense = proj_dots + elementwise, scores_f32, moe_all, 2 * e, dense_all
  elif policy == "full":
    att, att32, moe, moe32, dense = d, 0, 0, 0, 0
  elif policy in ("dots", "dots_with_no_batch_dims"):
    att, moe, moe32, dense = proj_dots, moe_dots, e, dense_dots
    att32 = score_dots_f32 if policy == "dots" else 0
    if policy == "dots" and not flash:
      att += h * dv / t  # the probabilities x values product
  else:
    raise ValueError(f"remat_policy={remat_policy!r}: expected none, full, dots, dots_with_no_batch_dims")
  return dict(attention=att, attention_f32=att32, moe=moe, moe_f32=moe32, dense=dense, input=d,
              rows_per_token=rows,
              one_layer_recompute=max(proj_dots + elementwise + moe_all, proj_dots + elementwise + dense_all),
              one_layer_recompute_f32=scores_f32 + 2 * e)


def memory_plan(cfg: ModelConfig, mesh_sizes: Mapping[str, int], *, batch_size: int, seq_len: int,
                param_dtype: Optional[str] = None, opt_dtype: str = "float32",
                remat_policy: Optional[str] = None, zero1_axes: Sequence[str] = (),
                compute_dtype: Optional[str] = None, attention_impl: str = "xla",
                capacity_factor: Optional[float] = None, rules: Optional[Sequence] = None) -> dict:
  """Per-device bytes of a training run on a mesh (module docstring for every term).

  Args:
    cfg: the model.
    mesh_sizes: {'data', 'fsdp', 'expert', 'tensor'} axis sizes (missing axes are 1).
    batch_size: global batch in sequences.
    seq_len: tokens per sequence.
    param_dtype: storage dtype of parameters and gradients (default cfg.param_dtype).
    opt_dtype: AdamW moment dtype ('float32' or 'bfloat16').
    remat_policy: activation checkpointing (default cfg.remat_policy).
    zero1_axes: mesh axes the optimizer state is additionally split over (ZeRO-1), e.g. ('data',).
    compute_dtype: activation dtype (default cfg.dtype).
    attention_impl: 'xla' (scores materialized) or 'pallas' (flash kernel).
    capacity_factor: expert-parallel slot capacity (None: dropless worst case).
    rules: logical-axis rules (default `sharding.LOGICAL_RULES`).
  Returns:
    dict with bytes per device: params, grads, optimizer, activations, total; plus devices, tokens_per_device,
    params_total_bytes (unsharded), largest per-device arrays, and the inputs.
  """
  from deepseek_jax.sharding import LOGICAL_RULES  # pylint: disable=g-import-not-at-top
  rules = LOGICAL_RULES if rules is None else tuple(rules)
  sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
  unknown = set(mesh_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh_sizes: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  if any(v < 1 for v in sizes.values()):
    raise ValueError(f"mesh_sizes={dict(mesh_sizes)}: sizes must be >= 1")
  devices = math.prod(sizes.values())
  param_dtype = param_dtype or cfg.param_dtype
  compute_dtype = compute_dtype or cfg.dtype
  remat_policy = remat_policy or cfg.remat_policy
  pb, ob, ab = _bytes(param_dtype), _bytes(opt_dtype), _bytes(compute_dtype)
  master = 4 if jnp.dtype(param_dtype) != jnp.float32 else 0

  params = opt = 0
  total = 0
  per_array = []
  for path, shape, shards in _leaf_shards(cfg, sizes, rules):
    local = math.prod(-(-d // s) for d, s in zip(shape, shards))
    total += math.prod(shape)
    params += local
    z = _zero1_extra(shape, shards, sizes, zero1_axes)
    opt += (2 * ob + master) * (-(-local // z))
    per_array.append(("/".join(path), local * pb))
  per_array.sort(key=lambda x: -x[1])

  token_axes = [a for a in _rule(rules, "activation_batch") if sizes.get(a, 1) > 1]
  shards, used = 1, []
  for a in token_axes:
    if batch_size % (shards * sizes[a]) == 0:
      shards *= sizes[a]
      used.append(a)
  tokens = batch_size * seq_len / shards
  act = activation_elements_per_token(cfg, seq_len=seq_len, tensor=sizes["tensor"],
                                      expert=sizes["expert"], remat_policy=remat_policy,
                                      attention_impl=attention_impl, capacity_factor=capacity_factor)
  n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  n_moe = cfg.num_moe_layers + (cfg.num_nextn_predict_layers if cfg.n_routed_experts else 0)
  n_dense = n_layers - n_moe
  per_token = (n_layers * (act["attention"] * ab + act["attention_f32"] * 4)
               + n_moe * (act["moe"] * ab + act["moe_f32"] * 4) + n_dense * act["dense"] * ab)
  if remat_policy != "none":
    per_token += act["one_layer_recompute"] * ab + act["one_layer_recompute_f32"] * 4
  heads = (1 + cfg.num_nextn_predict_layers) * 2 * cfg.vocab_size / sizes["tensor"] * 4
  activations = tokens * (per_token + heads)
  out = dict(
      mesh=sizes, devices=devices, batch_size=batch_size, seq_len=seq_len, tokens_per_device=tokens,
      token_axes=tuple(used), param_dtype=str(param_dtype), opt_dtype=str(opt_dtype),
      compute_dtype=str(compute_dtype), remat_policy=remat_policy, zero1_axes=tuple(zero1_axes),
      capacity_factor=capacity_factor, params_total=total, params_total_bytes=total * pb,
      params=params * pb, grads=params * pb, optimizer=opt, activations=int(activations),
      activations_per_token_per_layer={k: act[k] for k in ("attention", "moe", "dense")},
      expert_rows_per_token=act["rows_per_token"],
      largest_arrays=per_array[:5])
  out["total"] = out["params"] + out["grads"] + out["optimizer"] + out["activations"]
  return out


def _gib(x) -> str:
  return f"{x / 2**30:,.2f} GiB"


def format_memory_plan(plan: dict) -> str:
  """A readable table of `memory_plan`'s result."""
  mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "single device"
  rows = [
      ("mesh", f"{mesh} ({plan['devices']:,} devices)"),
      ("batch x seq_len", f"{plan['batch_size']:,} x {plan['seq_len']:,} "
                          f"({plan['tokens_per_device']:,.0f} tokens per device, split over "
                          f"{'/'.join(plan['token_axes']) or 'nothing'})"),
      ("parameters (all)", f"{plan['params_total']:,} = {_gib(plan['params_total_bytes'])} "
                           f"in {plan['param_dtype']}"),
      ("parameters per device", _gib(plan["params"])),
      ("gradients per device", _gib(plan["grads"])),
      (f"optimizer per device (AdamW {plan['opt_dtype']}"
       f"{', ZeRO-1 over ' + '/'.join(plan['zero1_axes']) if plan['zero1_axes'] else ''})",
       _gib(plan["optimizer"])),
      (f"activations per device (remat {plan['remat_policy']}, {plan['compute_dtype']}, "
       f"{plan['expert_rows_per_token']:g} expert rows/token)", _gib(plan["activations"])),
      ("total per device", _gib(plan["total"])),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_mesh(text: str) -> dict:
  """'data:32,expert:64' -> {'data': 32, 'expert': 64}.

  Raises:
    ValueError naming the bad entry.
  """
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition(":")
    if not sep or name not in MESH_AXES or not value.isdigit() or int(value) < 1:
      raise ValueError(f"--mesh entry {part!r}: expected AXIS:SIZE with AXIS in {MESH_AXES}, SIZE >= 1")
    out[name] = int(value)
  return out
