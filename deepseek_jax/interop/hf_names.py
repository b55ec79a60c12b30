"""The table between HF checkpoint tensor names and the model's variables.

Every HF tensor of a DeepSeek-V2/V3 checkpoint is one `Entry`: its HF name, the variable it fills
(collection + path in `model.init`'s tree) and how the layouts relate:
- 'copy': same array (norm weights, embedding, e_score_correction_bias);
- 'linear': HF `[out, in]` is the kernel `[in..., out...]` flattened: kernel = W.T.reshape(in + out), with
  `n_in` leading kernel dims forming `in` (o_proj [H, Dv, D] has n_in = 2);
- 'expert': the per-expert HF `[out, in]` weight `experts.{j}.*` is slice j of the stacked kernel
  [E, in, out].
MTP depth k (1-based) is HF layer num_hidden_layers + k - 1; its `embed_tokens` and `shared_head.head` are
copies of the main embedding and head (`alias` entries: written on save, skipped on load).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and the variable it maps to.

  Attributes:
    hf: HF tensor name.
    collection: 'params' or 'router'.
    path: keys of the variable inside its collection.
    kind: 'copy' | 'linear' | 'expert'.
    n_in: kernel dims that form the HF input dim ('linear'); 1 for experts.
    expert: expert index j ('expert').
    fp8: whether the released FP8 checkpoint stores this tensor as blockwise E4M3 + weight_scale_inv.
    rope: for q_proj / q_b_proj / kv_a_proj_with_mqa, which output columns carry rope ('q': the last
      qk_rope_head_dim of each head, 'kv': the last qk_rope_head_dim); None otherwise.
    alias: a copy of another tensor (the MTP layer's embed_tokens / shared_head.head).
    mtp_depth: the MTP depth (1-based) this tensor belongs to, 0 for the main model.
  """
  hf: str
  collection: str
  path: tuple
  kind: str = "copy"
  n_in: int = 1
  expert: Optional[int] = None
  fp8: bool = False
  rope: Optional[str] = None
  alias: bool = False
  mtp_depth: int = 0


def _layer(cfg: ModelConfig, hf: str, fl: tuple, moe: bool, depth: int) -> list[Entry]:
  """Entries of one decoder block: hf prefix 'model.layers.{i}.', flax prefix e.g. ('layers_3',)."""
  def p(name, path, **kw):
    return Entry(hf + name, "params", fl + path, mtp_depth=depth, **kw)

  def lin(name, path, **kw):
    return p(name + ".weight", path + ("kernel",), kind="linear", fp8=kw.pop("fp8", True), **kw)

  out = [p("input_layernorm.weight", ("input_layernorm", "weight")),
         p("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"))]
  a = ("self_attn",)
  if cfg.q_lora_rank is None:
    out.append(lin("self_attn.q_proj", a + ("q_proj",), rope="q"))
  else:
    out += [lin("self_attn.q_a_proj", a + ("q_a_proj",)),
            p("self_attn.q_a_layernorm.weight", a + ("q_a_layernorm", "weight")),
            lin("self_attn.q_b_proj", a + ("q_b_proj",), rope="q")]
  out += [lin("self_attn.kv_a_proj_with_mqa", a + ("kv_a_proj_with_mqa",), rope="kv"),
          p("self_attn.kv_a_layernorm.weight", a + ("kv_a_layernorm", "weight")),
          lin("self_attn.kv_b_proj", a + ("kv_b_proj",)),
          lin("self_attn.o_proj", a + ("o_proj",), n_in=2)]
  m = ("mlp",)
  if not moe:
    out += [lin(f"mlp.{n}", m + (n,)) for n in ("gate_proj", "up_proj", "down_proj")]
    return out
  out.append(lin("mlp.gate", m + ("gate",), fp8=False))
  if cfg.has_router_bias:
    out.append(Entry(hf + "mlp.gate.e_score_correction_bias", "router",
                     fl + m + ("gate", "e_score_correction_bias"), mtp_depth=depth))
  for j in range(cfg.n_routed_experts):
    for n in ("gate_proj", "up_proj", "down_proj"):
      out.append(p(f"mlp.experts.{j}.{n}.weight", m + ("experts", n), kind="expert", expert=j, fp8=True))
  if cfg.n_shared_experts:
    out += [lin(f"mlp.shared_experts.{n}", m + ("shared_experts", n))
            for n in ("gate_proj", "up_proj", "down_proj")]
  return out


def mtp_prefix(cfg: ModelConfig, depth: int) -> str:
  """HF name prefix of MTP depth `depth` (1-based): 'model.layers.{num_hidden_layers + depth - 1}.'."""
  return f"model.layers.{cfg.num_hidden_layers + depth - 1}."


def iter_entries(cfg: ModelConfig) -> Iterator[Entry]:
  """`entries`, one at a time (a caller can stop early, e.g. when a config needs more than a file holds)."""
  yield Entry("model.embed_tokens.weight", "params", ("embed_tokens", "embedding"))
  for i in range(cfg.num_hidden_layers):
    yield from _layer(cfg, f"model.layers.{i}.", (f"layers_{i}",), cfg.is_moe_layer(i), 0)
  yield Entry("model.norm.weight", "params", ("norm", "weight"))
  if not cfg.tie_word_embeddings:
    yield Entry("lm_head.weight", "params", ("lm_head", "kernel"), kind="linear")
  for k in range(1, cfg.num_nextn_predict_layers + 1):
    hf, fl = mtp_prefix(cfg, k), (f"mtp_{k - 1}",)
    yield Entry(hf + "enorm.weight", "params", fl + ("enorm", "weight"), mtp_depth=k)
    yield Entry(hf + "hnorm.weight", "params", fl + ("hnorm", "weight"), mtp_depth=k)
    yield Entry(hf + "eh_proj.weight", "params", fl + ("eh_proj", "kernel"), kind="linear", mtp_depth=k)
    yield from _layer(cfg, hf, fl + ("block",), cfg.n_routed_experts is not None, k)
    yield Entry(hf + "shared_head.norm.weight", "params", fl + ("shared_head_norm", "weight"), mtp_depth=k)
    yield Entry(hf + "embed_tokens.weight", "params", ("embed_tokens", "embedding"), alias=True,
                mtp_depth=k)
    if cfg.tie_word_embeddings:
      yield Entry(hf + "shared_head.head.weight", "params", ("embed_tokens", "embedding"), alias=True,
                  mtp_depth=k)
    else:
      yield Entry(hf + "shared_head.head.weight", "params", ("lm_head", "kernel"), kind="linear",
                  alias=True, mtp_depth=k)


def entries(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of cfg's checkpoint in file order (embedding, layers, norm, head, MTP layers)."""
  return list(iter_entries(cfg))


def scale_name(weight_name: str) -> str:
  """The FP8 scale tensor of a weight: 'X.weight' -> 'X.weight_scale_inv'."""
  return weight_name + "_scale_inv"


# Tensors some released checkpoints carry that no computation needs (buffers saved by older code).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
