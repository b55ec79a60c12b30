"""The policy's side of GRPO: per-token log-probs of rollouts (optionally with routing replay) and the
jitted update step.

One update on a (mini)batch {'tokens' [B, S], 'mask' [B, S-1], 'fed' [B, S-1], 'advantages' [B],
'old_logp' / 'ref_logp' [B, S-1], and 'replay' (the sampler's routing, when replayed) or 'sampled' (the
sampler's experts, when not: for the mismatch metric)}:
  1. forward of tokens[:, :-1] through the main model (no MTP), routed as replayed when given;
  2. log-probs of tokens[:, 1:] at the sampling temperature; the GRPO objective (`grpo.grpo_loss`);
     plus alpha x the mean sequence-wise balance loss when alpha > 0;
  3. AdamW step at a constant learning rate; the routing biases move by gamma against the step's expert
     loads (gamma 0: frozen).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax.inference.generate import routing_rows
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.posttrain import replay as replay_lib
from deepseek_jax.posttrain.grpo import GRPOLoss, grpo_loss, token_log_probs
from deepseek_jax.training import balance as balance_lib


def forward_log_probs(model: DeepSeekV3, variables, tokens, *, temperature: float = 1.0, replay=None,
                      record: bool = False):
  """log pi(tokens[:, t + 1] | tokens[:, :t + 1]) [B, S - 1] and the router statistics.

  Args:
    model: the policy.
    variables: {'params', 'router'}.
    tokens: int32 [B, S].
    temperature: the sampling temperature the log-probs are taken at.
    replay: the 'replay' collection (`replay.replay_collection`) or None (route freely).
    record: also return the routing the forward took (batch first, as the generator records it).
  Returns:
    (logp [B, S - 1], stats list, routing tree or None).
  """
  variables = dict(variables)
  if replay is not None:
    variables["replay"] = replay_lib.model_layout(replay)
  inputs = tokens[:, :-1]
  if record:
    (_, logits, stats, _), rec = model.apply(variables, inputs, method=DeepSeekV3.main, mutable=["routing"])
    routing = routing_rows(rec.get("routing", {}), *inputs.shape)
  else:
    _, logits, stats, _ = model.apply(variables, inputs, method=DeepSeekV3.main)
    routing = None
  return token_log_probs(logits, tokens[:, 1:], temperature), stats, routing


def _stacked(stats, key):
  stats = [s for s in stats if s is not None]
  if not stats:
    return None
  return jnp.stack([s[key] for s in stats])


def make_score_fn(model: DeepSeekV3, *, temperature: float):
  """Jitted score(variables, tokens, replay) -> logp [B, S - 1] (old / reference policy log-probs)."""

  def score(variables, tokens, replay):
    return forward_log_probs(model, variables, tokens, temperature=temperature, replay=replay)[0]

  return jax.jit(score)


def make_grpo_step(model: DeepSeekV3, tx: optax.GradientTransformation, loss: GRPOLoss, *, lr: float,
                   temperature: float = 1.0, alpha: float = 0.0, gamma: float = 0.0,
                   state_sharding: Optional[object] = None, mesh=None):
  """The jitted GRPO update: step(state, batch) -> (state, metrics) (see module docstring).

  Args:
    model: the policy.
    tx: optimizer from `training.make_optimizer`.
    loss: the objective's settings.
    lr: learning rate (constant).
    temperature: sampling temperature.
    alpha: sequence-wise balance-loss weight (0: off).
    gamma: routing-bias update speed (0: frozen).
    state_sharding: TrainState-shaped shardings (the state keeps its layout), or None.
    mesh: the mesh the metrics are replicated on, or None.
  Returns:
    step; metrics are float32 scalars 'loss', 'pg_loss', 'kl', 'clip_fraction', 'ratio', 'balance',
    'grad_norm', and 'routing_mismatch' for a MoE policy trained without replay.
  """

  def loss_fn(params, router, batch):
    replay = batch.get("replay")
    record = replay is None and "sampled" in batch
    logp, stats, routing = forward_log_probs(model, {"params": params, "router": router}, batch["tokens"],
                                             temperature=temperature, replay=replay, record=record)
    value, st = grpo_loss(loss, logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                          batch["mask"])
    balance = _stacked(stats, "balance_loss")
    balance = jnp.float32(0.0) if balance is None else balance.mean()
    tpe = _stacked(stats, "tokens_per_expert")
    tpe = jnp.zeros((0, 1), jnp.float32) if tpe is None else tpe
    st = dict(st, pg_loss=value, balance=balance)
    if record:
      st["routing_mismatch"] = replay_lib.expert_mismatch(routing, batch["sampled"], batch["fed"])
    return value + alpha * balance, (st, tpe)

  def step(state, batch):
    (value, (st, tpe)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.router, batch)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    router = balance_lib.update_bias(state.router, tpe, gamma) if gamma and tpe.shape[0] else state.router
    metrics = dict(st, loss=value, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, router=router, opt_state=opt), metrics

  kwargs = {}
  if state_sharding is not None:
    metrics_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    kwargs["out_shardings"] = (state_sharding, metrics_sharding)
  return jax.jit(step, donate_argnums=(0,), **kwargs)
