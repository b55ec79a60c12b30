"""The jitted train and eval steps.

One train step, on a global batch {'inputs', 'targets'} int32 [B, S]:
  1. split the batch into `grad_accum` microbatches (row j goes to microbatch j mod A, so each microbatch
     spans every data shard) and scan over them, summing gradients, loss parts and expert loads;
  2. global gradient norm; a non-finite loss or norm marks the step bad;
  3. AdamW update (clip, Adam, decoupled decay) times -lr(step);
  4. auxiliary-loss-free bias update from the loads of the whole global batch;
  5. a bad step keeps params, optimizer and router state unchanged and counts it (skipped, bad_streak).
Under `jax.jit` with a batch sharded over the data axes, every mean and load sum above is global.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax.ops import impls
from deepseek_jax.training import balance as balance_lib
from deepseek_jax.training.losses import cross_entropy, objective
from deepseek_jax.training.optimizer import Schedules
from deepseek_jax.training.state import TrainState


def _microbatches(x, accum: int):
  """[B, ...] -> [A, B / A, ...] with row j in microbatch j mod A."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)


def make_train_step(model, tx: optax.GradientTransformation, schedules: Schedules, *, alpha: float,
                    grad_accum: int = 1, state_sharding: Optional[Any] = None,
                    batch_sharding: Optional[Any] = None, donate: bool = True) -> Callable:
  """Builds the jitted train step.

  Args:
    model: the DeepSeekV3 module.
    tx: optimizer from `make_optimizer` (no learning rate inside).
    schedules: learning rate, MTP weight, bias speed as functions of the step.
    alpha: sequence-wise balance-loss weight.
    grad_accum: microbatches per step (the global batch must divide by it).
    state_sharding: TrainState-shaped shardings (in and out), or None.
    batch_sharding: sharding of the [B, S] batch arrays, or None.
    donate: donate the input state's buffers.
  Returns:
    step(state, batch) -> (state, metrics), metrics a dict of float32 scalars plus 'imbalance' [L_moe]
    (max / mean expert load per MoE layer) and 'tokens_per_expert' [L_moe, E].
  """
  accum = int(grad_accum)
  if accum < 1:
    raise ValueError(f"grad_accum={grad_accum} must be >= 1")
  model = _resolved(model, batch_sharding)

  def loss_fn(params, router, inputs, targets, lam):
    out = model.apply({"params": params, "router": router}, inputs)
    loss, parts = objective(out, targets, mtp_lambda=lam, alpha=alpha)
    tpe = out.tokens_per_expert
    if tpe is None:
      tpe = jnp.zeros((0, 1), jnp.float32)
    return loss, (parts, tpe)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict):
    inputs, targets = batch["inputs"], batch["targets"]
    if inputs.shape[0] % accum:
      raise ValueError(f"global batch {inputs.shape[0]} is not divisible by grad_accum={accum}")
    lam = schedules.mtp_lambda(state.step)
    if accum == 1:
      (loss, (parts, tpe)), grads = grad_fn(state.params, state.router, inputs, targets, lam)
    else:
      xs = (_microbatches(inputs, accum), _microbatches(targets, accum))

      def body(carry, mb):
        g_acc, l_acc, p_acc, t_acc = carry
        (l, (p, t)), g = grad_fn(state.params, state.router, mb[0], mb[1], lam)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        p_acc = jax.tree.map(jnp.add, p_acc, p)
        return (g_acc, l_acc + l, p_acc, t_acc + t), None

      abstract = jax.eval_shape(grad_fn, state.params, state.router, xs[0][0], xs[1][0], lam)
      (_, (p0, t0)), _ = abstract
      zeros = lambda s: jnp.zeros(s.shape, jnp.float32)
      init = (jax.tree.map(zeros, state.params), jnp.float32(0.0), jax.tree.map(zeros, p0),
              zeros(t0))
      (grads, loss, parts, tpe), _ = jax.lax.scan(body, init, xs)
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, state.params)
      loss = loss / accum
      parts = jax.tree.map(lambda x: x / accum, parts)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = schedules.learning_rate(state.step)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u: (p - lr * u.astype(jnp.float32)).astype(p.dtype),
                              state.params, updates)
    gamma = schedules.bias_gamma(state.step)
    new_router = balance_lib.update_bias(state.router, tpe, gamma) if tpe.shape[0] else state.router

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        router=keep(new_router, state.router),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_streak=jnp.where(finite, 0, state.bad_streak + 1).astype(jnp.int32))
    metrics = {"loss": loss, "ce": parts["ce"], "mtp": parts["mtp"], "balance": parts["balance"],
               "grad_norm": grad_norm, "lr": lr, "mtp_lambda": lam, "gamma": gamma,
               "finite": finite.astype(jnp.float32), "skipped": new_state.skipped,
               "bad_streak": new_state.bad_streak, "tokens_per_expert": tpe,
               "imbalance": (balance_lib.load_imbalance(tpe) if tpe.shape[0]
                             else jnp.zeros((0,), jnp.float32))}
    metrics.update(balance_lib.bias_stats(new_state.router))
    return new_state, metrics

  kwargs = {}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, _replicated(batch_sharding))
  return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)


def _resolved(model, batch_sharding):
  """The model with its implementation choices resolved (`ops.impls`) for the batch's mesh (else the ambient
  one)."""
  mesh = batch_sharding.mesh if isinstance(batch_sharding, NamedSharding) else None
  return model.clone(cfg=impls.resolve_config(model.cfg, mesh=mesh))


def _replicated(batch_sharding) -> Optional[NamedSharding]:
  """Metrics replicated on the batch's mesh: every process can read them (multi-process runs)."""
  if isinstance(batch_sharding, NamedSharding):
    return NamedSharding(batch_sharding.mesh, PartitionSpec())
  return None


def make_eval_step(model, *, state_sharding: Optional[Any] = None,
                   batch_sharding: Optional[Any] = None) -> Callable:
  """Builds the jitted held-out step.

  Args:
    model: the DeepSeekV3 module.
    state_sharding: TrainState-shaped shardings, or None.
    batch_sharding: sharding of the batch arrays, or None.
  Returns:
    eval(state, batch) -> (sum of next-token cross-entropies, token count), float32 scalars.
  """
  model = _resolved(model, batch_sharding)

  def evaluate(state: TrainState, batch: dict):
    out = model.apply(state.variables, batch["inputs"])
    return cross_entropy(out.logits, batch["targets"])

  kwargs = {}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = _replicated(batch_sharding)
  return jax.jit(evaluate, **kwargs)
