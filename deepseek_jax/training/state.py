"""The train state: everything a step reads and writes, one pytree (what checkpoints save)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, updates attempted so far (skipped ones included).
    params: trained parameters (fp32 master weights).
    router: the non-trained 'router' collection (routing biases).
    opt_state: optimizer state.
    rng: uint32 [2] PRNG key, folded with the step for anything random in a step.
    skipped: int32 scalar, steps whose update was skipped for a non-finite loss or gradient.
    bad_streak: int32 scalar, consecutive skipped steps up to now.
  """
  step: jax.Array
  params: Any
  router: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array
  bad_streak: jax.Array

  @property
  def variables(self) -> dict:
    """The model variables {'params', 'router'} for `model.apply`."""
    return {"params": self.params, "router": self.router}


def create_state(variables: dict, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh TrainState at step 0.

  Args:
    variables: {'params': ..., 'router': ...} from `model.init` (router may be absent).
    tx: the optimizer.
    rng: PRNG key (uint32 [2]).
  Returns:
    TrainState.
  """
  params = variables["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, router=variables.get("router", {}),
                    opt_state=tx.init(params), rng=jnp.asarray(rng, jnp.uint32),
                    skipped=jnp.zeros([], jnp.int32), bad_streak=jnp.zeros([], jnp.int32))


def init_state(model, tx_factory: Callable[[Any], optax.GradientTransformation], rng, seq_len: int,
               sharding: Optional[Any] = None, variables: Optional[dict] = None,
               abstract_only: bool = False):
  """Initializes the model and optimizer under jit, laid out by `sharding`.

  Args:
    model: the DeepSeekV3 module.
    tx_factory: params -> optimizer (the decay mask needs the parameter tree).
    rng: PRNG key (uint32 [2]); split into the init key and the state's key.
    seq_len: sequence length of the dummy init batch.
    sharding: a function abstract TrainState -> matching pytree of shardings, or None (default placement).
    variables: start from these variables (e.g. a converted checkpoint) instead of a random init.
    abstract_only: return the state as jax.ShapeDtypeStructs (with their shardings) without computing it,
      the target of a checkpoint restore.
  Returns:
    (state, tx, state_shardings or None).
  """
  init_key, state_key = jax.random.split(jnp.asarray(rng, jnp.uint32))
  tokens = jnp.zeros((1, seq_len), jnp.int32)

  def make(key, given):
    v = given if given is not None else model.init(key, tokens)
    tx = tx_factory(v["params"])
    return create_state(v, tx, state_key)

  abstract_vars = (variables if variables is not None
                   else jax.eval_shape(lambda k: model.init(k, tokens), init_key))
  tx = tx_factory(abstract_vars["params"])
  abstract = jax.eval_shape(make, init_key, variables)
  shardings = None if sharding is None else sharding(abstract)
  if abstract_only:
    if shardings is not None:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
    return abstract, tx, shardings
  fn = jax.jit(make, out_shardings=shardings)
  return fn(init_key, variables), tx, shardings
