"""Per-device memory and communication of a training step, from shapes and shardings alone (nothing allocated).

State. The train state's arrays come from `jax.eval_shape` of the model's init with their real dtypes and
logical axis names; each array's per-device shard follows from the rules table of `deepseek_jax.sharding`
on a mesh given by its axis sizes (a dim is split over its mesh axes only where they divide it, as
`sharding.fit_spec` does). What the training code holds (`training.state`, `training.optimizer`,
`training.step`):
  params      the parameters in `param_dtype` (the fp32 parameters are the master weights of the bf16 and
              FP8 recipes: there is no second copy), and the router's fp32 correction biases
  grads       one gradient per parameter in `param_dtype`; with grad_accum > 1 also the fp32 accumulator
              the step's scan over microbatches carries
  optimizer   AdamW mu and nu in the moment dtype (`optimizer.mu_dtype`) on the parameters' shards, further
              split over `zero1_axes` where given (`sharding.train_state_sharding(zero1_axes=...)`)
  batch       the step's int32 inputs and targets, split over the token axes

Activations of one microbatch (T = microbatch x seq_len / token shards tokens per device, a = bytes of the
compute dtype). Per layer kind, the arrays the backward pass of a block reads (`block_residuals`, elements
per token; fp32 where the model computes in fp32):
  MLA    norm input and output, q_a and its norm, q, q_pe / k_pe rotated, kv_a, norm(c_kv), kv_b's output,
         the concatenated per-head q and k, the attention output; the softmax statistics (XLA: the chunked
         causal probabilities, fp32; 'pallas': the log-sum-exp only)
  MoE    norm input and output, router logits and scores (fp32), the tokens' K sorted rows (R with the
         padded exchange of backends without a ragged all-to-all), the R received
         rows, gate / up / silu x up [3 R F / t], expert outputs R, the returned K rows, shared experts; the
         cotangents of the routed rows are fp32 (the gate weights are)
  dense  norm input and output, gate / up / silu x up [3 I / t], output
  MTP    the embedding, two norms and eh_proj's input [2 D], then an MoE block
Rows per token R (routed rows a device holds per local token): expected K under balanced routing; what the
expert-parallel dispatch allocates (`ops.expert_parallel`) is the bound: ep x min(K, E / ep) without a
capacity (dropless worst case) or capacity_factor x K with `ModelConfig.moe_capacity_factor`.
Per remat policy: 'none' keeps every block's residuals; 'full' keeps each block's input [D] and reruns one
block at a time in the backward, whose residuals and their cotangents are then live; 'dots' /
'dots_with_no_batch_dims' keep the matmul outputs. The head keeps the logits and the cross-entropy's
gradient, fp32 [T, V / t] each, for the main model and every MTP depth. With FSDP the block being computed
holds its parameters gathered over 'fsdp' and their gradients before the reduce-scatter.

The total is what is live at the step's peak: state + batch + saved activations + the larger of the two
working sets (one block's backward, or the head's loss and gradient).
"""

from __future__ import annotations

import dataclasses
import functools
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
GB = 1e9


def _bytes(dtype) -> int:
  return int(np.dtype(jnp.dtype(dtype)).itemsize)


def _rule(rules, name):
  for k, v in rules:
    if k == name:
      return () if v is None else ((v,) if isinstance(v, str) else tuple(v))
  return ()


def _shards(logical: Sequence, shape: Sequence[int], mesh_sizes: Mapping[str, int], rules) -> tuple:
  """(devices each dim is split over, mesh axes used) from the rules fitted by `sharding.fit_spec`."""
  from deepseek_jax.sharding import fit_spec  # pylint: disable=g-import-not-at-top
  entries = []
  for name in tuple(logical) + (None,) * (len(shape) - len(logical)):
    names = () if name is None else ((name,) if isinstance(name, str) else tuple(name))
    axes = tuple(a for n in names for a in _rule(rules, n))
    entries.append(axes or None)
  fitted = fit_spec(PartitionSpec(*entries), shape, types.SimpleNamespace(shape=dict(mesh_sizes)))
  sizes, used = [], set()
  for axes in fitted:
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    used.update(names)
    sizes.append(math.prod(mesh_sizes.get(a, 1) for a in names))
  return sizes, used


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One variable of the model: collection, path, global shape, dtype, per-dim shards, mesh axes used."""
  collection: str
  path: tuple
  shape: tuple
  dtype: str
  shards: tuple
  axes: frozenset

  @property
  def local(self) -> int:
    """Elements of this variable on one device."""
    return math.prod(-(-d // s) for d, s in zip(self.shape, self.shards))


def variable_leaves(cfg: ModelConfig, mesh_sizes: Mapping[str, int], rules=None) -> tuple[Leaf, ...]:
  """Every variable of `DeepSeekV3(cfg)` with its real dtype and its shards on the mesh."""
  from deepseek_jax.sharding import LOGICAL_RULES  # pylint: disable=g-import-not-at-top
  rules = LOGICAL_RULES if rules is None else tuple(tuple(r) for r in rules)
  return _variable_leaves(cfg, tuple(sorted(mesh_sizes.items())), rules)


@functools.lru_cache(maxsize=16)
def _boxed_variables(cfg: ModelConfig):
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  from deepseek_jax.sharding import boxed_abstract_variables  # pylint: disable=g-import-not-at-top
  return boxed_abstract_variables(DeepSeekV3(cfg), jnp.zeros((1, 1), jnp.int32))


@functools.lru_cache(maxsize=32)
def _variable_leaves(cfg: ModelConfig, mesh_items: tuple, rules: tuple) -> tuple[Leaf, ...]:
  mesh_sizes = dict(mesh_items)
  boxed = _boxed_variables(cfg)
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
  out = []
  for path, leaf in traverse_util.flatten_dict(nn.unbox(boxed)).items():
    shards, used = _shards(tuple(specs[path]), leaf.shape, mesh_sizes, rules)
    out.append(Leaf(path[0], tuple(path[1:]), tuple(leaf.shape), str(leaf.dtype), tuple(shards),
                    frozenset(used)))
  return tuple(out)


def _zero1_extra(leaf: Leaf, mesh_sizes, axes) -> int:
  """Extra split of an optimizer-state copy over `axes` on its first whole, divisible dim (1 if none), as
  `sharding.train_state_sharding(zero1_axes=...)` lays it out."""
  axes = tuple(a for a in axes if mesh_sizes.get(a, 1) > 1 and a not in leaf.axes)
  size = math.prod(mesh_sizes.get(a, 1) for a in axes)
  if size <= 1:
    return 1
  for dim, s in zip(leaf.shape, leaf.shards):
    if s == 1 and dim % size == 0:
      return size
  return 1


def expert_rows_per_token(cfg: ModelConfig, expert: int, capacity_factor: Optional[float]) -> dict:
  """Routed rows a device holds per local token: expected (balanced routing) and the dispatch's bound.

  Returns:
    dict: expected (K), bound, bound_name.
  """
  if not cfg.n_routed_experts:
    return dict(expected=0, bound=0, bound_name="no routed experts")
  k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
  if expert <= 1:
    return dict(expected=k, bound=k, bound_name="one device: exactly K rows per token (sorted, dropless)")
  if capacity_factor is None:
    return dict(expected=k, bound=expert * min(k, e // expert),
                bound_name=f"dropless worst case ep x min(K, E/ep) = {expert} x {min(k, e // expert)}")
  return dict(expected=k, bound=capacity_factor * k,
              bound_name=f"capacity {capacity_factor:g} x the balanced share (rows past it dropped)")


def block_residuals(cfg: ModelConfig, kind: str, *, seq_len: int, tensor: int = 1, rows: float = 0.0,
                    attention_impl: str = "xla", sent_rows: Optional[float] = None) -> dict:
  """Elements per token one block's backward reads with no rematerialization (module docstring).

  Args:
    cfg: the model.
    kind: 'dense', 'moe' (a main-model block) or 'mtp' (an MTP depth's projection + block).
    seq_len: S (the XLA attention keeps probabilities over the keys).
    tensor: the tensor axis size.
    rows: routed rows held per token (`expert_rows_per_token`'s bound).
    attention_impl: 'xla' (chunked causal probabilities kept) or 'pallas' (flash: log-sum-exp only).
    sent_rows: rows per token of the buffers a device sends and gets back (default K, the ragged exchange's
      sorted rows; the padded exchange sends `rows`).
  Returns:
    dict: act (compute-dtype elements), f32 (fp32 elements), dots and dots_f32 (the matmul outputs among
    them, what the 'dots' policies keep), routed_rows (elements whose cotangents are fp32 whatever the
    compute dtype).
  """
  from deepseek_jax.ops.attention import _chunks  # pylint: disable=g-import-not-at-top
  d, h, t = cfg.hidden_size, cfg.num_attention_heads, max(1, tensor)
  dqk, dv, dn = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim
  dc, dr, dq = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank or 0
  ht = h / t
  # MLA: norm in/out, q_a + its norm, q, rotated q_pe, kv_a, norm(c_kv), rotated k_pe, kv_b out, concatenated
  # q and k, attention output.
  att_dots = dq + ht * dqk + (dc + dr) + ht * (dn + dv) + ht * dv
  att = (2 * d + 2 * dq + ht * dqk + ht * dr + (dc + dr) + dc + dr + ht * (dn + dv) + 2 * ht * dqk
         + ht * dv)
  if attention_impl == "pallas":
    att32, att32_dots = ht, 0.0
  else:
    chunks = _chunks(seq_len)
    keys = sum((b - a) * b for a, b in chunks) / seq_len          # mean keys scored per query
    att32, att32_dots = ht * keys + ht * dv, ht * keys
  out = dict(act=att, f32=att32, dots=att_dots, dots_f32=att32_dots, routed_rows=0.0)
  if kind == "dense":
    i = cfg.intermediate_size / t
    out["act"] += 2 * d + 3 * i + d
    out["dots"] += 2 * i + d
  else:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    f = cfg.moe_intermediate_size / t
    fs = cfg.moe_intermediate_size * cfg.n_shared_experts / t
    sent = k if sent_rows is None else sent_rows
    routed = sent * d + rows * d + 3 * rows * f + rows * d + sent * d
    shared = (3 * fs + d) if cfg.n_shared_experts else 0
    out["act"] += 2 * d + routed + shared + d
    out["f32"] += 2 * e
    out["dots"] += (2 * fs + d if cfg.n_shared_experts else 0)
    out["dots_f32"] += e
    # Rows of D whose cotangents are fp32: the gate weights are fp32, so the combine's gradient is, and it
    # flows back as fp32 through the returned rows, the expert outputs and the dispatch buffers.
    out["routed_rows"] = 2 * sent * d + 3 * rows * d
    if kind == "mtp":
      out["act"] += 2 * d + 2 * d
  return out


def memory_plan(cfg: ModelConfig, mesh_sizes: Mapping[str, int], *, batch_size: int, seq_len: int,
                grad_accum: int = 1, moment_dtype: str = "float32", zero1_axes: Sequence[str] = (),
                attention_impl: str = "pallas", capacity_factor="config", hbm_gb: Optional[float] = None,
                rules: Optional[Sequence] = None, dispatch: str = "ragged") -> dict:
  """Per-device bytes of one train step of `cfg` on a mesh (module docstring for every term).

  The dtypes are the model's: `cfg.param_dtype` for parameters and gradients, `cfg.dtype` for activations
  (`training.config.model_config` sets them from the precision recipe); remat policy and layer layout are
  cfg's too.

  Args:
    cfg: the model.
    mesh_sizes: {'data', 'fsdp', 'expert', 'tensor'} axis sizes (missing axes are 1).
    batch_size: global batch of one step, in sequences.
    seq_len: tokens per sequence.
    grad_accum: microbatches per step (`training.step`): activations are those of batch_size / grad_accum.
    moment_dtype: AdamW moment dtype ('float32' or 'bfloat16', `optimizer.mu_dtype`).
    zero1_axes: mesh axes the optimizer state is additionally split over (ZeRO-1), e.g. ('data',).
    attention_impl: 'pallas' (the GPU flash kernel) or 'xla' (the chunked causal attention of CPU runs).
    capacity_factor: expert-parallel capacity; 'config' takes cfg.moe_capacity_factor (None: dropless).
    hbm_gb: device memory in GB (10^9 bytes) for the verdict; None: no verdict.
    rules: logical-axis rules (default `sharding.LOGICAL_RULES`).
    dispatch: the expert-parallel exchange (`ops.expert_parallel`): 'ragged' (GPU: a device sends its
      tokens' K sorted rows) or 'padded' (backends without a ragged all-to-all: [ep, C, D] buffers, the
      bound's rows, both ways).
  Returns:
    dict of per-device bytes: params, router, grads, optimizer, batch_inputs, saved_activations,
    layer_working_set, head_working_set, activations, total; and devices, tokens_per_device, microbatch,
    token_axes, expert_rows (expected, bound, bound_name), terms (name -> bytes, for the verdict), verdict.
  """
  from deepseek_jax.sharding import LOGICAL_RULES  # pylint: disable=g-import-not-at-top
  rules = LOGICAL_RULES if rules is None else tuple(rules)
  unknown = set(mesh_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
  if any(v < 1 for v in sizes.values()):
    raise ValueError(f"mesh {dict(mesh_sizes)}: sizes must be >= 1")
  if grad_accum < 1 or batch_size % grad_accum:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of grad_accum={grad_accum}")
  if capacity_factor == "config":
    capacity_factor = cfg.moe_capacity_factor
  devices = math.prod(sizes.values())
  ab, ob = _bytes(cfg.dtype), _bytes(moment_dtype)

  leaves = variable_leaves(cfg, sizes, rules)
  params = router = grads = accum = opt = 0
  total_numbers = 0
  gathered_layer = 0.0
  for leaf in leaves:
    b = _bytes(leaf.dtype)
    total_numbers += math.prod(leaf.shape)
    if leaf.collection != "params":
      router += leaf.local * b
      continue
    params += leaf.local * b
    grads += leaf.local * b
    accum += leaf.local * 4
    opt += 2 * ob * -(-leaf.local // _zero1_extra(leaf, sizes, zero1_axes))
  if grad_accum > 1:
    grads += accum
  # The block being computed holds its weights gathered over fsdp and their full gradients: the largest
  # layer's share (scanned runs stack layers along a leading axis of `length`).
  per_layer = {}
  for leaf in leaves:
    if leaf.collection != "params" or "fsdp" not in leaf.axes or sizes["fsdp"] == 1:
      continue
    top = leaf.path[0]
    length = 1
    if cfg.scan_layers and top.startswith("layers_") and "_to_" in top:
      a, b = (int(x) for x in top[len("layers_"):].split("_to_"))
      length = b - a + 1
    per_layer[top] = per_layer.get(top, 0.0) + leaf.local * sizes["fsdp"] / length * _bytes(leaf.dtype)
  body = {k: v for k, v in per_layer.items() if k not in ("embed_tokens", "lm_head")}
  gathered_layer = 2 * max(body.values(), default=0.0)
  gathered_head = 2 * sum(v for k, v in per_layer.items() if k in ("embed_tokens", "lm_head"))

  # Tokens per device: the 'activation_batch' rule's axes, in order, while they divide the microbatch.
  micro = batch_size // grad_accum
  shards, used = 1, []
  for a in _rule(rules, "activation_batch"):
    if sizes.get(a, 1) > 1 and micro % (shards * sizes[a]) == 0:
      shards *= sizes[a]
      used.append(a)
  tokens = micro * seq_len / shards
  batch_inputs = 2 * 4 * batch_size * seq_len / shards
  if dispatch not in ("ragged", "padded"):
    raise ValueError(f"dispatch={dispatch!r}: expected 'ragged' or 'padded'")
  rows = expert_rows_per_token(cfg, sizes["expert"] if "expert" in used else 1, capacity_factor)
  sent = rows["bound"] if dispatch == "padded" and "expert" in used else None
  t = sizes["tensor"]
  kinds = {"dense": cfg.num_hidden_layers - cfg.num_moe_layers, "moe": cfg.num_moe_layers,
           "mtp": cfg.num_nextn_predict_layers}
  res = {k: block_residuals(cfg, "dense" if (k == "mtp" and not cfg.n_routed_experts) else k,
                            seq_len=seq_len, tensor=t, rows=rows["bound"], attention_impl=attention_impl,
                            sent_rows=sent)
         for k in kinds}
  res_bytes = {k: r["act"] * ab + r["f32"] * 4 for k, r in res.items()}
  policy = cfg.remat_policy
  saved = 0.0
  for k, n in kinds.items():
    if k == "mtp" or policy == "none":      # MTP blocks are not checkpointed
      saved += n * res_bytes[k]
    elif policy == "full":
      saved += n * cfg.hidden_size * ab
    else:
      r = res[k]
      keep32 = r["dots_f32"] if policy == "dots" else 0.0
      saved += n * (cfg.hidden_size * ab + r["dots"] * ab + keep32 * 4)
  # One block's backward: its residuals (recomputed unless all were kept) plus their cotangents.
  cot_bytes = {k: res_bytes[k] + res[k]["routed_rows"] * (4 - ab) for k in kinds}
  worst = max((k for k, n in kinds.items() if n), key=lambda k: res_bytes[k] + cot_bytes[k])
  layer_ws = tokens * (res_bytes[worst] + cot_bytes[worst]) + gathered_layer
  v = cfg.vocab_size / t
  head_ws = tokens * (1 + cfg.num_nextn_predict_layers) * 2 * v * 4 + gathered_head
  saved *= tokens
  activations = saved + max(layer_ws, head_ws)
  out = dict(
      mesh=sizes, devices=devices, batch_size=batch_size, grad_accum=grad_accum, microbatch=micro,
      seq_len=seq_len, tokens_per_device=tokens, token_axes=tuple(used), param_dtype=cfg.param_dtype,
      compute_dtype=cfg.dtype, precision=cfg.precision, moment_dtype=str(moment_dtype),
      remat_policy=policy, zero1_axes=tuple(zero1_axes), attention_impl=attention_impl,
      capacity_factor=capacity_factor, params_total=total_numbers, expert_rows=rows,
      params=int(params), router=int(router), grads=int(grads), optimizer=int(opt),
      batch_inputs=int(batch_inputs), saved_activations=int(saved), layer_working_set=int(layer_ws),
      head_working_set=int(head_ws), activations=int(activations),
      worst_block=worst)
  out["total"] = (out["params"] + out["router"] + out["grads"] + out["optimizer"] + out["batch_inputs"]
                  + out["activations"])
  out["terms"] = {"parameters": out["params"] + out["router"], "gradients": out["grads"],
                  "optimizer state": out["optimizer"], "saved activations": out["saved_activations"],
                  f"one {worst} block's backward" if layer_ws >= head_ws else "logits and their gradient":
                  max(layer_ws, head_ws), "batch": out["batch_inputs"]}
  if hbm_gb is not None:
    out["hbm_gb"] = hbm_gb
    out["verdict"] = verdict(out["total"], hbm_gb, out["terms"])
  return out


def verdict(total: float, hbm_gb: float, terms: Mapping[str, float]) -> str:
  """'fits in 80 GB with 12.3 GB to spare' or 'does not fit in 80 GB: needs 95.1 GB, largest term ...'."""
  spare = hbm_gb * GB - total
  if spare >= 0:
    return f"fits in {hbm_gb:g} GB with {spare / GB:,.1f} GB to spare"
  name, size = max(terms.items(), key=lambda kv: kv[1])
  return (f"does not fit in {hbm_gb:g} GB: needs {total / GB:,.1f} GB; largest term is {name} "
          f"({size / GB:,.1f} GB)")


def communication_plan(cfg: ModelConfig, plan: dict, *, gpu, gpus_per_node: int = 8, mfu: float = 0.4,
                       precision: str = "bf16", rules: Optional[Sequence] = None) -> dict:
  """Bytes each device sends per step, and their time, next to the step's compute time.

  Collectives (ring algorithms: an all-gather or reduce-scatter over n devices sends (n - 1) / n of the full
  array per device, an all-reduce twice that):
    fsdp gathers      every fsdp-sharded parameter gathered in the forward and again in the backward, per
                      microbatch, in its stored dtype
    fsdp reduce-scatter  its gradient, per microbatch, in the parameter dtype
    grad all-reduce   parameters replicated over token axes other than fsdp (data, and expert for the
                      non-expert weights) all-reduce their gradient over them once per microbatch
    tensor all-reduce the row-parallel products' partial sums [T, D], in the compute dtype
    expert all-to-all each MoE block sends its tokens' routed rows to the experts and back, in the compute
                      dtype; (ep - 1) / ep of the expected T x K rows leave the device; forward, backward of
                      both exchanges, and the forward again under 'full' remat
  Mesh axes are laid out with the last (tensor, then expert) fastest: an axis whose stride times size fits in
  a node runs over NVLink, otherwise its traffic is counted at InfiniBand speed (the fraction that stays
  in the node is counted at NVLink speed).

  Args:
    cfg: the model.
    plan: `memory_plan`'s result.
    gpu: a `hardware.GPU`.
    gpus_per_node: devices per node.
    mfu: model FLOPs utilization the compute time assumes.
    precision: the peak the MFU refers to ('bf16' or 'fp8').
    rules: logical-axis rules (default `sharding.LOGICAL_RULES`).
  Returns:
    dict: rows [{collective, axis, bytes, link, seconds}], compute_s, comm_s, per-link totals.
  """
  from deepseek_jax.analysis import flops as flops_lib  # pylint: disable=g-import-not-at-top
  sizes = plan["mesh"]
  accum = plan["grad_accum"]
  leaves = variable_leaves(cfg, sizes, rules)
  stride, strides = 1, {}
  for a in reversed(MESH_AXES):
    strides[a] = stride
    stride *= sizes[a]

  def in_node_fraction(axis):
    n = sizes[axis]
    if n <= 1:
      return 1.0
    # Peers of a device along this axis that share its node.
    span = max(1, gpus_per_node // strides[axis]) if strides[axis] < gpus_per_node else 1
    local = min(n, span)
    return (local - 1) / (n - 1)

  nv = gpu.nvlink_gb_s / 2 * GB        # per direction
  ib = gpu.ib_gb_s * GB

  def seconds(nbytes, axis):
    f = in_node_fraction(axis)
    return nbytes * f / nv + nbytes * (1 - f) / ib

  rows = []

  def add(name, axis, nbytes):
    if nbytes <= 0 or sizes.get(axis, 1) <= 1:
      return
    f = in_node_fraction(axis)
    link = "NVLink" if f == 1 else ("InfiniBand" if f == 0 else f"NVLink {f:.0%} / InfiniBand")
    rows.append(dict(collective=name, axis=axis, bytes=nbytes, link=link, seconds=seconds(nbytes, axis)))

  fsdp = sizes["fsdp"]
  gather = scatter = 0.0
  reduce = {a: 0.0 for a in ("data", "expert")}
  for leaf in leaves:
    if leaf.collection != "params":
      continue
    b = _bytes(leaf.dtype) * leaf.local
    if "fsdp" in leaf.axes:
      gather += 2 * (fsdp - 1) * b
      scatter += (fsdp - 1) * b
    for a in reduce:
      if a not in leaf.axes and sizes[a] > 1 and a in plan["token_axes"]:
        reduce[a] += 2 * (sizes[a] - 1) / sizes[a] * b
  add("fsdp all-gather (params, fwd + bwd)", "fsdp", accum * gather)
  add("fsdp reduce-scatter (grads)", "fsdp", accum * scatter)
  for a, v in reduce.items():
    add(f"{a} all-reduce (grads of replicated params)", a, accum * v)
  t = sizes["tensor"]
  if t > 1:
    # Partial sums of the row-parallel products (o_proj, the MLPs' down projections, the experts' combine)
    # all-reduced over 'tensor': two per block forward, two in the backward, two more rerun under 'full'.
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    passes = 4 + (2 if cfg.remat_policy == "full" else 0)
    size = plan["tokens_per_device"] * cfg.hidden_size * _bytes(cfg.dtype)
    add(f"tensor all-reduce (activations, {passes} per block)", "tensor",
        accum * blocks * passes * 2 * (t - 1) / t * size)
  ep = sizes["expert"] if "expert" in plan["token_axes"] else 1
  if cfg.n_routed_experts and ep > 1:
    n_moe = cfg.num_moe_layers + cfg.num_nextn_predict_layers
    passes = 4 + (2 if cfg.remat_policy == "full" else 0)
    per = plan["tokens_per_device"] * plan["expert_rows"]["expected"] * cfg.hidden_size * _bytes(cfg.dtype)
    add(f"expert all-to-all ({passes} exchanges per MoE block)", "expert",
        accum * n_moe * passes * per * (ep - 1) / ep)
  # Every device computes its share of the step's FLOPs (tensor parallel ranks split each token's work).
  tokens = plan["batch_size"] * plan["seq_len"] / plan["devices"]
  train = flops_lib.train_flops_per_token(cfg, plan["seq_len"])
  compute = tokens * train.hardware / (gpu.peak_flops(precision) * mfu)
  links = {}
  for r in rows:
    links[r["link"]] = links.get(r["link"], 0.0) + r["seconds"]
  return dict(rows=rows, compute_s=compute, mfu=mfu, precision=precision, tokens_per_device=tokens,
              train_flops_per_token=train.hardware, comm_s=sum(r["seconds"] for r in rows),
              nvlink_gb_s=nv / GB, ib_gb_s=ib / GB, gpus_per_node=gpus_per_node, links=links)


def _gb(x) -> str:
  return f"{x / GB:,.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:,.2f} MB"


def format_memory_plan(plan: dict) -> str:
  """A readable table of `memory_plan`'s result."""
  mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "single device"
  r = plan["expert_rows"]
  rows = [
      ("mesh", f"{mesh} ({plan['devices']:,} devices)"),
      ("batch x seq_len", f"{plan['batch_size']:,} x {plan['seq_len']:,} in {plan['grad_accum']} "
                          f"microbatch(es) of {plan['microbatch']:,}: {plan['tokens_per_device']:,.0f} "
                          f"tokens per device each (split over {'/'.join(plan['token_axes']) or 'nothing'})"),
      ("recipe", f"{plan['precision']}: parameters {plan['param_dtype']}, compute {plan['compute_dtype']}, "
                 f"AdamW moments {plan['moment_dtype']}, remat {plan['remat_policy']}, attention "
                 f"{plan['attention_impl']}"),
      ("parameters (all)", f"{plan['params_total']:,}"),
      ("parameters per device", _gb(plan["params"] + plan["router"])),
      ("gradients per device" + (" (+ fp32 accumulator)" if plan["grad_accum"] > 1 else ""),
       _gb(plan["grads"])),
      ("optimizer per device" + (f" (ZeRO-1 over {'/'.join(plan['zero1_axes'])})"
                                 if plan["zero1_axes"] else ""), _gb(plan["optimizer"])),
      ("batch per device", _gb(plan["batch_inputs"])),
      ("routed rows per token", f"expected {r['expected']:g} (balanced routing); bound {r['bound']:g}: "
                                f"{r['bound_name']}"),
      ("saved activations", _gb(plan["saved_activations"])),
      (f"one {plan['worst_block']} block's backward", _gb(plan["layer_working_set"])),
      ("logits and their gradient", _gb(plan["head_working_set"])),
      ("total per device", _gb(plan["total"])),
  ]
  if "verdict" in plan:
    rows.append(("verdict", plan["verdict"]))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_communication(comm: dict) -> str:
  """A readable table of `communication_plan`'s result."""
  lines = [f"per step and device: {comm['tokens_per_device']:,.0f} tokens' work; links NVLink "
           f"{comm['nvlink_gb_s']:g} GB/s, InfiniBand {comm['ib_gb_s']:g} GB/s per direction "
           f"({comm['gpus_per_node']} GPUs per node)"]
  width = max([len(r["collective"]) for r in comm["rows"]] + [10])
  for r in comm["rows"]:
    lines.append(f"{r['collective']:<{width}}  over {r['axis']:<6}  {r['bytes'] / GB:>9,.1f} GB  "
                 f"{r['link']:<24}  {r['seconds']:>8,.2f} s")
  lines.append(f"{'communication (if not overlapped)':<{width}}  {comm['comm_s']:,.2f} s")
  lines.append(f"{'compute at ' + format(comm['mfu'], '.0%') + ' MFU (' + comm['precision'] + ' peak)':<{width}}"
               f"  {comm['compute_s']:,.2f} s")
  return "\n".join(lines)


def parse_mesh(text: str) -> dict:
  """'fsdp:32,expert:64' -> {'fsdp': 32, 'expert': 64}.

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
