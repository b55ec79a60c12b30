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

from deepseek_jax.config import ModelConfig
from deepseek_jax.ops import fp8

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
