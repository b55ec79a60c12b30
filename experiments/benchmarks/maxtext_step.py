"""MaxText's own DeepSeek train step on one of our configs: the MaxText contender of `--suite=train`.

MaxText (`pip install maxtext`, Python >= 3.12; see the README's "Benchmarks against MaxText") is built
from its `base.yml` with the model fields overridden from our `ModelConfig` (`maxtext_overrides`), its
synthetic dataset at our batch and sequence length, and then set up and jitted by MaxText's own
`train_utils.setup_train_loop` and `jit_train_and_eval_step` around `pre_train.train.train_step`, exactly
as its `train.py` does.  What is timed is one call of that jitted step (forward, backward, AdamW, clipping).

MaxText's expert layer has three modes, each a `VARIANTS` entry:
  'dense'      (sparse_matmul=False, no capacity): every expert runs on every token, masked by the gates;
               dropless, and MaxText's fastest dropless mode on CPU;
  'sparse'     (sparse_matmul=True, megablox=False): tokens sorted by expert, `jax.lax.ragged_dot`;
  'capacity'   (sparse_matmul=False, capacity_factor=1.25): a capacity-factor einsum that drops tokens.
All keep MaxText's own defaults otherwise (remat_policy 'full', scanned layers: in one interleaved run on
2 cores these took 1.73 s a step against 1.93 with remat 'none' and unscanned layers), in our compute dtype.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import sys
import tempfile

VARIANTS = {
    "dense": dict(sparse_matmul=False, megablox=False, capacity_factor=-1.0),
    "sparse": dict(sparse_matmul=True, megablox=False, capacity_factor=-1.0),
    "capacity": dict(sparse_matmul=False, megablox=False, capacity_factor=1.25),
}


def available() -> bool:
  """Whether MaxText can be imported here (it needs Python >= 3.12)."""
  os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")   # MaxText's switch for its optional Google Cloud deps
  try:
    with contextlib.redirect_stdout(sys.stderr):     # it prints which of those it stubs
      importlib.import_module("maxtext.configs.pyconfig")
      importlib.import_module("maxtext.trainers.pre_train.train")
  except (ImportError, SyntaxError):   # not installed, or installed under Python < 3.12
    return False
  return True


def maxtext_overrides(cfg) -> dict:
  """MaxText `base.yml` overrides for the architecture of a `ModelConfig` (V3-style routing).

  Raises ValueError for what MaxText's 'deepseek' decoder block cannot express the same way.
  """
  if cfg.moe_layer_freq != 1:
    raise ValueError(f"MaxText's deepseek block has no moe_layer_freq; got {cfg.moe_layer_freq}")
  if cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc":
    raise ValueError("the MaxText contender maps only V3 routing (sigmoid, noaux_tc), got "
                     f"{cfg.scoring_func}, {cfg.topk_method}")
  out = dict(
      decoder_block="deepseek", attention_type="mla", attention="dot_product",
      vocab_size=cfg.vocab_size, base_emb_dim=cfg.hidden_size, base_num_query_heads=cfg.num_attention_heads,
      base_num_kv_heads=cfg.num_attention_heads, base_mlp_dim=cfg.intermediate_size,
      base_moe_mlp_dim=cfg.moe_intermediate_size, base_num_decoder_layers=cfg.num_hidden_layers,
      first_num_dense_layers=cfg.first_k_dense_replace, mlp_activations=["silu", "linear"],
      q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
      num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      shared_experts=cfg.n_shared_experts, routed_scaling_factor=cfg.routed_scaling_factor,
      routed_score_func="sigmoid", routed_bias=True, norm_topk_prob=cfg.norm_topk_prob,
      n_routing_groups=cfg.n_group if cfg.n_group > 1 else -1,
      topk_routing_group=cfg.topk_group if cfg.n_group > 1 else -1,
      normalization_layer_epsilon=cfg.rms_norm_eps, logits_via_embedding=cfg.tie_word_embeddings,
      rope_max_timescale=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
      mtp_num_layers=cfg.num_nextn_predict_layers, enable_dropout=False,
      dtype=cfg.dtype, weight_dtype=cfg.param_dtype)
  rs = cfg.rope_scaling
  if rs is None:
    out["rope_type"] = "default"
  elif rs.type == "yarn" and rs.mscale == rs.mscale_all_dim:
    # MaxText's `mscale` is the softmax-scale one (DeepSeek's mscale_all_dim); the rotary embedding's own
    # magnitude factor is then 1, as it is here when the two are equal.
    out.update(rope_type="yarn", rope_factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
               mscale=rs.mscale_all_dim, original_max_position_embeddings=rs.original_max_position_embeddings)
  else:
    raise ValueError(f"the MaxText contender maps only YaRN with mscale == mscale_all_dim, got {rs}")
  return out


def maxtext_train_step(cfg, batch: int, seq_len: int, variant: str = "dense", **extra):
  """(thunk running one MaxText train step and blocking on it, info) for `cfg` at batch x seq_len.

  `variant` is a `VARIANTS` key; `extra` are further `base.yml` overrides.  MaxText's own prints during
  setup go to stderr, so that a suite's JSON on stdout stays clean.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown MaxText variant {variant!r}; one of {sorted(VARIANTS)}")
  if not available():
    raise ImportError("maxtext is not importable here (it needs Python >= 3.12)")
  import jax  # pylint: disable=g-import-not-at-top
  import maxtext  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.linen import partitioning as nn_partitioning  # pylint: disable=g-import-not-at-top
  from maxtext.configs import pyconfig  # pylint: disable=g-import-not-at-top
  from maxtext.trainers.pre_train import train  # pylint: disable=g-import-not-at-top
  from maxtext.utils import sharding, train_utils  # pylint: disable=g-import-not-at-top

  out_dir = tempfile.mkdtemp(prefix="maxtext_bench_")   # MaxText's base_output_directory, empty here
  atexit.register(shutil.rmtree, out_dir, True)
  overrides = dict(
      run_name=f"bench_{variant}", base_output_directory=out_dir,
      hardware=jax.default_backend() if jax.default_backend() in ("cpu", "gpu") else "tpu",
      dataset_type="synthetic", enable_checkpointing=False, enable_tensorboard=False,
      enable_goodput_recording=False, monitor_goodput=False, skip_jax_distributed_system=True,
      steps=1000, learning_rate=1e-3, log_period=1_000_000, per_device_batch_size=batch / jax.device_count(),
      max_target_length=seq_len, packing=False, gradient_clipping_threshold=1.0, opt_type="adamw",
      **maxtext_overrides(cfg), **VARIANTS[variant])
  overrides.update(extra)
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  with contextlib.redirect_stdout(sys.stderr):
    config = pyconfig.initialize([None, base] + [f"{k}={v}" for k, v in overrides.items()])
    (init_rng, _, state_shardings, model, mesh, _, _, data_loader, rampup, eval_iter,
     state) = train_utils.setup_train_loop(config, None)
    jit_model = model
    if config.pure_nnx:
      num_params = _size(nnx.state(state.model, nnx.Param))
      jit_model, state = nnx.split(state)
    else:
      num_params = _size(state.params)
    params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(config, state_shardings)
    p_train_step, _ = train_utils.jit_train_and_eval_step(
        config, jit_model, mesh, state, state_shardings, train.train_step, train.eval_step, eval_iter,
        params_shardings)
    data = data_loader.load_next_batch(rampup_manager=rampup)
  rng = () if config.pure_nnx else (init_rng,)
  held = [state]

  def step():
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(config.logical_axis_rules):
      held[0], metrics = p_train_step(held[0], data, *rng)
    return float(jax.block_until_ready(metrics["scalar"]["learning/loss"]))

  first_loss = step()
  info = {"maxtext": getattr(maxtext, "__version__", "unknown"), "variant": variant,
          "overrides": dict(VARIANTS[variant], **extra), "params": num_params, "first_loss": first_loss}
  return step, info


def _size(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))
