"""FP8 weight storage for inference: the released checkpoints' E4M3 weights kept on device.

With `ModelConfig.fp8_weights=True`, every weight the released FP8 checkpoints quantize (the MLA
projections, the dense MLPs, the shared and routed experts; not the embedding, head, router gate, norms or
eh_proj) is a float8_e4m3fn parameter plus a float32 `<name>_scale_inv` parameter with one entry per
`fp8_weight_block` x `fp8_weight_block` block: half the bytes of bf16.

Layout: a checkpoint weight W [out, in] with `weight_scale_inv` S [ceil(out/b), ceil(in/b)] becomes the kernel
codes W.T reshaped to the kernel's [in..., out...] shape and the scale S.T [ceil(in/b), ceil(out/b)], whose
blocks tile the flattened 2-D kernel [prod(in), prod(out)] (square blocks: the block grid of W.T is the
transpose of W's).  A routed-expert stack [E, in, out] has scales [E, ceil(in/b), ceil(out/b)].

The forward dequantizes the blocks inside the jitted computation (W = codes * scale_inv per block, in fp32,
then the compute dtype), or, with `precision='fp8'`, runs `fp8.fp8_matmul_quantized` on the stored codes
(FP8 tensor cores where the backend has them).  The weights are not trainable in this form.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import fp8

# Linear layers whose weights the released FP8 checkpoints store as E4M3 (docs/reference.md 'FP8 checkpoint');
# the same set as the `fp8=True` entries of `deepseek_jax.interop.hf_names`.
FP8_LINEAR_NAMES = frozenset({"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                              "gate_proj", "up_proj", "down_proj"})
SCALE_SUFFIX = "_scale_inv"
# The codes' init spans +-4 std: a weight drawn from N(0, std^2) and clipped there, stored with a scale of
# 4 std / 448 in every block.
_INIT_SPAN = 4.0


def stores_fp8(cfg: ModelConfig, name: str, fp8_compute: bool = True) -> bool:
  """Whether the Linear called `name` keeps its kernel as E4M3 codes + scales under `cfg`."""
  return bool(cfg.fp8_weights and fp8_compute and name in FP8_LINEAR_NAMES)


def _codes_init(std: float):
  s0 = _INIT_SPAN * std / fp8.E4M3_MAX

  def init(key, shape, dtype=fp8.E4M3):
    w = jax.random.normal(key, shape, jnp.float32) * std
    return jnp.clip(w / s0, -fp8.E4M3_MAX, fp8.E4M3_MAX).astype(dtype)
  return init, s0


def scale_shape(shape: Sequence[int], n_lead: int, n_in: int, block: int) -> tuple:
  """The scale_inv shape of codes `shape` = lead (n_lead dims) + in (n_in dims) + out."""
  lead, rest = tuple(shape[:n_lead]), tuple(shape[n_lead:])
  k, n = math.prod(rest[:n_in]), math.prod(rest[n_in:])
  return lead + (-(-k // block), -(-n // block))


def fp8_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], *, n_lead: int,
              n_in: int, std: float, block: int):
  """Creates the E4M3 codes `name` and the float32 `name_scale_inv` of a weight.

  Args:
    module: the Flax module that owns the parameters.
    name: parameter name of the codes.
    shape: the weight's shape, lead + in + out (lead: e.g. the expert axis).
    axes: logical axis names of `shape`.
    n_lead, n_in: dims of `shape` that are lead dims and input dims.
    std: std of the (clipped) normal init.
    block: square block size of the scales.

  Returns:
    (codes float8_e4m3fn `shape`, scale_inv float32 lead + [ceil(in / block), ceil(out / block)]).
  """
  init, s0 = _codes_init(std)
  codes = module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), fp8.E4M3)
  sshape = scale_shape(shape, n_lead, n_in, block)
  scale_axes = tuple(axes[:n_lead]) + (None, None)
  scale = module.param(name + SCALE_SUFFIX,
                       nn.with_logical_partitioning(nn.initializers.constant(s0), scale_axes),
                       sshape, jnp.float32)
  return codes, scale


def dequantize(codes, scale, *, n_lead: int, n_in: int, block: int, dtype=jnp.float32):
  """The weight (codes' shape) of E4M3 codes and their per-block scale_inv, computed in fp32.

  Args:
    codes: float8_e4m3fn lead + in + out.
    scale: float32 lead + [ceil(in / block), ceil(out / block)].
    n_lead, n_in: as in `fp8_param`.
    block: square block size.
    dtype: result dtype.

  Returns:
    Array of codes' shape and `dtype`.
  """
  shape = codes.shape
  lead, rest = shape[:n_lead], shape[n_lead:]
  k, n = math.prod(rest[:n_in]), math.prod(rest[n_in:])
  w = fp8.dequantize_blockwise(codes.reshape(lead + (k, n)), scale, (block, block), dtype=jnp.float32)
  return w.reshape(shape).astype(dtype)


def quantize(w, *, n_lead: int, n_in: int, block: int):
  """`dequantize`'s inverse: (E4M3 codes of w's shape, float32 scale_inv) per square block.

  Works on NumPy and jax arrays.
  """
  shape = tuple(w.shape)
  lead, rest = shape[:n_lead], shape[n_lead:]
  k, n = math.prod(rest[:n_in]), math.prod(rest[n_in:])
  codes, scale = fp8.quantize_blockwise(w.reshape(lead + (k, n)), (block, block))
  return codes.reshape(shape), scale


def expert_kernels(module: nn.Module, cfg: ModelConfig):
  """The routed experts' stacked weights of an `fp8_weights` model, dequantized to the compute dtype.

  Creates gate_proj / up_proj [E, D, F] and down_proj [E, F, D] as E4M3 codes with `*_scale_inv`
  [E, ceil(in / b), ceil(out / b)].

  Returns:
    (w_gate, w_up, w_down) in cfg.dtype.
  """
  e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  b = cfg.fp8_weight_block
  out = []
  for name, shape, axes in [("gate_proj", (e, d, f), ("expert", "embed", "moe_mlp")),
                            ("up_proj", (e, d, f), ("expert", "embed", "moe_mlp")),
                            ("down_proj", (e, f, d), ("expert", "moe_mlp", "embed"))]:
    codes, scale = fp8_param(module, name, shape, axes, n_lead=1, n_in=1, std=cfg.initializer_range,
                             block=b)
    out.append(dequantize(codes, scale, n_lead=1, n_in=1, block=b, dtype=jnp.dtype(cfg.dtype)))
  return tuple(out)


# ------------------------------------------------------------------------------------------------------
# Whole models: conversion and memory
# ------------------------------------------------------------------------------------------------------

def _leaves(tree) -> dict:
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(getattr(k, "key", getattr(k, "name", None)) for k in kp)] = leaf
  return out


def _unflatten(items: dict) -> dict:
  root: dict = {}
  for path, v in items.items():
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = v
  return root


def fp8_layout(cfg: ModelConfig) -> dict:
  """{path of each E4M3 variable of cfg's fp8_weights model: (n_lead, n_in)}; path = (collection, ...)."""
  from deepseek_jax.interop import hf_names  # pylint: disable=g-import-not-at-top
  out = {}
  for e in hf_names.entries(cfg):
    if e.fp8 and not e.alias:
      out[(e.collection,) + e.path] = (1, 1) if e.kind == "expert" else (0, e.n_in)
  return out


def _abstract(cfg: ModelConfig) -> dict:
  from deepseek_jax.interop.placement import abstract_variables  # pylint: disable=g-import-not-at-top
  return _leaves(abstract_variables(cfg))


def quantize_variables(cfg: ModelConfig, variables):
  """An in-memory model converted to FP8 weight storage (per-block E4M3, as the released checkpoints).

  Args:
    cfg: a config with fp8_weights=False.
    variables: its variables (as `init` / `load` make them).

  Returns:
    (cfg with fp8_weights=True, variables of that model): the FP8 set's weights as codes + scale_inv, every
    other variable unchanged.
  """
  if cfg.fp8_weights:
    raise ValueError("quantize_variables: cfg.fp8_weights is already True")
  cfg8 = cfg.replace(fp8_weights=True)
  layout = fp8_layout(cfg8)
  have = _leaves(variables)
  out = {}
  for path, leaf in _abstract(cfg8).items():
    if path in layout:
      n_lead, n_in = layout[path]
      codes, scale = quantize(jnp.asarray(have[path]), n_lead=n_lead, n_in=n_in,
                              block=cfg8.fp8_weight_block)
      out[path] = codes
      out[path[:-1] + (path[-1] + SCALE_SUFFIX,)] = scale
    elif path not in out:
      if path not in have:
        raise ValueError(f"quantize_variables: variables lack {'/'.join(path)}")
      out[path] = have[path]
  return cfg8, _unflatten(out)


def dequantize_variables(cfg: ModelConfig, variables, dtype=None):
  """The inverse of `quantize_variables`: (cfg with fp8_weights=False, plain variables).

  Args:
    cfg: a config with fp8_weights=True.
    variables: its variables.
    dtype: dtype of the dequantized weights (None: cfg.param_dtype).
  """
  if not cfg.fp8_weights:
    raise ValueError("dequantize_variables: cfg.fp8_weights is False")
  layout = fp8_layout(cfg)
  have = _leaves(variables)
  dtype = jnp.dtype(cfg.param_dtype if dtype is None else dtype)
  out = {}
  for path, v in have.items():
    if path[-1].endswith(SCALE_SUFFIX) and path[:-1] + (path[-1][:-len(SCALE_SUFFIX)],) in layout:
      continue
    if path in layout:
      n_lead, n_in = layout[path]
      scale = have[path[:-1] + (path[-1] + SCALE_SUFFIX,)]
      v = dequantize(jnp.asarray(v), jnp.asarray(scale), n_lead=n_lead, n_in=n_in,
                     block=cfg.fp8_weight_block, dtype=dtype)
    out[path] = v
  return cfg.replace(fp8_weights=False), _unflatten(out)


def weight_memory(cfg: ModelConfig) -> dict:
  """Bytes of the model's variables with bf16 weights vs FP8 weight storage, from shapes alone.

  Both count every variable at its dtype in the model (bf16 parameters, the fp32 router bias); the FP8
  model's quantized weights are 1 byte per element plus 4 bytes per block scale.

  Returns:
    {'bf16': total bytes, 'fp8': total bytes, 'ratio': fp8 / bf16, 'quantized_bf16': bytes of the FP8 set
     in bf16, 'quantized_fp8': its bytes as codes + scales, 'quantized_ratio'}.
  """
  nbytes = lambda leaf: math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  base = cfg.replace(param_dtype="bfloat16", fp8_weights=False)
  plain = _abstract(base)
  f8 = _abstract(base.replace(fp8_weights=True))
  layout = fp8_layout(base.replace(fp8_weights=True))
  q_bf16 = sum(nbytes(plain[p]) for p in layout)
  q_fp8 = sum(nbytes(f8[p]) + nbytes(f8[p[:-1] + (p[-1] + SCALE_SUFFIX,)]) for p in layout)
  total_bf16 = sum(nbytes(v) for v in plain.values())
  total_fp8 = sum(nbytes(v) for v in f8.values())
  return {"bf16": total_bf16, "fp8": total_fp8, "ratio": total_fp8 / total_bf16,
          "quantized_bf16": q_bf16, "quantized_fp8": q_fp8, "quantized_ratio": q_fp8 / q_bf16}
