"""FP8 weight storage of whole models: which variables are E4M3, and converting variables to and from it.

The per-layer storage (E4M3 codes + float32 `*_scale_inv` per block) is `deepseek_jax.layers.fp8_weights`;
here a model's variables, named by its ModelConfig, are converted as the released FP8 checkpoints store them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop import hf_names
from deepseek_jax.interop.placement import abstract_variables
from deepseek_jax.layers.fp8_weights import SCALE_SUFFIX, dequantize, quantize


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
  out = {}
  for e in hf_names.entries(cfg):
    if e.fp8 and not e.alias:
      out[(e.collection,) + e.path] = (1, 1) if e.kind == "expert" else (0, e.n_in)
  return out


def _abstract(cfg: ModelConfig) -> dict:
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
