"""One GRPO update (replayed routing, balance loss, bias update) on one device and on a data x fsdp x expert
mesh of 8 CPU devices; prints the largest differences as JSON.  Run by test_sharded.py in a subprocess."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import sharding as sharding_lib
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.posttrain import GRPOLoss, forward_log_probs, make_grpo_step, replay_collection
from deepseek_jax.training.optimizer import make_optimizer
from deepseek_jax.training.state import create_state
from tests.posttrain.conftest import MICRO


def main():
  model = DeepSeekV3(ModelConfig.preset("tiny", **MICRO))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  b, s = 8, 12
  tokens = jnp.asarray(rng.integers(0, 64, (b, s)), jnp.int32)
  logp, _, routing = forward_log_probs(model, variables, tokens, record=True)
  routing = jax.tree.map(lambda r: r.reshape(b, s - 1, -1), routing)
  batch = {"tokens": tokens, "mask": jnp.asarray(rng.random((b, s - 1)) < 0.7, jnp.float32),
           "fed": jnp.ones((b, s - 1), jnp.float32), "advantages": jnp.asarray(rng.normal(size=b), jnp.float32),
           "old_logp": logp + jnp.asarray(rng.normal(0, 0.2, logp.shape), jnp.float32),
           "ref_logp": logp + jnp.asarray(rng.normal(0, 0.2, logp.shape), jnp.float32),
           "replay": replay_collection(routing, s - 1)}
  tx = make_optimizer(variables["params"])
  loss = GRPOLoss("dapo", 0.2, 0.28, 0.05)
  kw = dict(lr=1e-3, alpha=0.01, gamma=0.01)
  fresh = lambda: create_state(jax.tree.map(jnp.copy, variables), tx, jax.random.PRNGKey(1))  # steps donate
  single_state, single = make_grpo_step(model, tx, loss, **kw)(fresh(), batch)
  mesh = sharding_lib.make_mesh(data=2, fsdp=2, expert=2)
  shardings = sharding_lib.train_state_sharding(model, mesh)(fresh())
  state = jax.device_put(fresh(), shardings)
  rows = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(sharding_lib.BATCH_AXES, *([None] * (x.ndim - 1))))), batch)
  with sharding_lib.use_mesh(mesh):
    sharded_state, sharded = make_grpo_step(model, tx, loss, state_sharding=shardings, mesh=mesh, **kw)(state, rows)
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  spread = {str(x.sharding.spec) for x in jax.tree.leaves(sharded_state.params)}
  print(json.dumps({"metrics": {k: [float(single[k]), float(sharded[k])] for k in single},
                    "params": diff(single_state.params, sharded_state.params),
                    "router": diff(single_state.router, sharded_state.router),
                    "update": diff(single_state.params, variables["params"]),
                    "specs": sorted(spread)}))


if __name__ == "__main__":
  main()
