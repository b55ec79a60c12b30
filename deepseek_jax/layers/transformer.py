"""One pre-norm decoder block: x + MLA(norm(x)), then h + FFN(norm(h)) with FFN dense or DeepSeekMoE."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe import MoE
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.ops import matmul as ops_matmul

ACT = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
  """input_layernorm -> self_attn (MLA) -> residual -> post_attention_layernorm -> mlp (dense or MoE).

  Attributes:
    cfg: the model config.
    moe: DeepSeekMoE (else the dense SwiGLU MLP).
    scan_step: the `nn.scan` body form (`scan_layers`): x is the carry `(x, cache)`, with cache None or the
      run's stacked caches plus a 'layer' index (this layer's, advanced by one on return); returns
      `((x, cache), stats)`.
  """
  cfg: ModelConfig
  moe: bool
  scan_step: bool = False

  @nn.compact
  def __call__(self, x, positions, cache=None, cache_start=None, absorbed: bool = False):
    """Returns (x [B,S,D], updated cache or None, router statistics or None)."""
    cfg = self.cfg
    if self.scan_step:
      x, cache = x
    x = nn.with_logical_constraint(x, ACT)
    h, cache = MLA(cfg, name="self_attn")(
        RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x),
        positions, cache=cache, cache_start=cache_start, absorbed=absorbed)
    x = x + h.astype(x.dtype)
    y = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype,
                name="post_attention_layernorm")(x)
    stats = None
    if self.moe:
      y, stats = MoE(cfg, name="mlp")(y)
    else:
      y = MLP(cfg, cfg.intermediate_size, name="mlp")(y)
    x = nn.with_logical_constraint(x + y.astype(x.dtype), ACT)
    if self.scan_step:
      if cache is not None:
        cache = dict(cache, layer=cache["layer"] + 1)
      return (x, cache), stats
    return x, cache, stats


def remat_block(cfg: ModelConfig):
  """DecoderLayer wrapped in jax.checkpoint according to cfg.remat_policy."""
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.remat_policy == "none":
    return DecoderLayer
  cp = jax.checkpoint_policies
  # The 'dots' policies save the host matmul's products too (a custom call, not a dot_general).
  host_products = cp.save_only_these_names(ops_matmul.PRODUCT_NAME)
  policy = {
      "full": None,
      "dots": cp.save_from_both_policies(cp.checkpoint_dots, host_products),
      "dots_with_no_batch_dims": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                            host_products),
  }[cfg.remat_policy]
  return nn.remat(DecoderLayer, policy=policy, static_argnums=(5,))


def scan_layers(cfg: ModelConfig, moe: bool, length: int):
  """`length` identical decoder blocks as one `nn.scan` (their parameters stacked along a leading 'layers'
  axis): one traced and compiled block instead of `length`.

  Call as `module((x, caches), positions, None, cache_start, absorbed)` with `caches` None or the run's
  per-layer caches stacked along axis 0 plus {'layer': 0}: the caches travel in the loop carry, so each
  layer writes its new latents in place; returns `((x, caches), stats)`, stats stacked along axis 0 (None
  for dense blocks).
  """
  # Routing replay's collections ride the layer axis too: 'replay' (input) and 'routing' (recorded output)
  # leaves are [layers, B * S, K] for the run.
  scanned = nn.scan(remat_block(cfg), variable_axes={"params": 0, "router": 0, "replay": 0, "routing": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, moe=moe, scan_step=True)


def zeros_like_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16, *,
                     layers: int | None = None) -> dict:
  """An empty latent cache of one layer: c_kv [B,T,Dc] and k_pe [B,T,Dr] (with `layers`, that many stacked
  along a leading axis: [L,B,T,Dc], [L,B,T,Dr])."""
  lead = () if layers is None else (layers,)
  return {"c_kv": jnp.zeros(lead + (batch, length, cfg.kv_lora_rank), dtype),
          "k_pe": jnp.zeros(lead + (batch, length, cfg.qk_rope_head_dim), dtype)}
