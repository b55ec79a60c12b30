"""The tiny model on a device mesh vs one device: forward, gradients, router statistics, training steps.

  python -m tests.parallel.model_worker layouts [OUT.npz]  # 8 devices, one process: JSON of differences
                                                           # (OUT.npz: the data2_fsdp2_expert2 results)
  python -m tests.parallel.model_worker kernels            # Pallas attention + experts (interpret mode) on
                                                           # data2_fsdp2_tensor2 vs one device: JSON
  python -m tests.parallel.model_worker run OUT.npz LAYOUT [COORD NUM_PROC PROC_ID]
      # one layout, optionally as one process of several (jax.distributed on CPU); process 0 writes OUT.npz
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from deepseek_jax import distributed  # noqa: E402

if len(sys.argv) > 3 and sys.argv[1] == "run" and len(sys.argv) == 7:
  distributed.initialize(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax import sharding  # noqa: E402
from deepseek_jax.training.optimizer import Schedules, make_optimizer  # noqa: E402
from deepseek_jax.training.state import create_state  # noqa: E402
from deepseek_jax.training.step import make_train_step  # noqa: E402

LAYOUTS = {"data2_fsdp2_expert2": dict(data=2, fsdp=2, expert=2),
           "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2)}
B, S, STEPS = 8, 16, 3
# Two layers (one dense, one MoE) and the MoE MTP block: every kind of block, fewer compilations.
CFG = dsj.ModelConfig.preset("tiny", num_hidden_layers=2)


def batch_np(step):
  rng = np.random.default_rng(100 + step)
  toks = rng.integers(0, CFG.vocab_size, (B, S + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def host_variables(model):
  tokens = jnp.asarray(batch_np(0)["inputs"])
  variables = model.init(jax.random.PRNGKey(0), tokens)
  variables["router"] = jax.tree.map(
      lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape), variables["router"])
  return jax.tree.map(np.asarray, variables)


def fwd_grad(model):
  def f(variables, tokens):
    def loss(params):
      out = model.apply({"params": params, "router": variables["router"]}, tokens)
      c = jnp.cos(jnp.arange(out.logits.size, dtype=jnp.float32).reshape(out.logits.shape) * 0.01)
      return jnp.sum(out.logits * c) + jnp.sum(out.mtp_logits[0] * c), out
    (_, out), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return out.logits, out.tokens_per_expert, out.balance_loss, g
  return f


def trainer(model, params):
  tx = make_optimizer(params, weight_decay=0.1, clip_norm=1.0)
  sched = Schedules(steps=STEPS, lr=1e-2, warmup_fraction=0.0, gamma=0.01)
  return tx, sched


def place(tree, shardings):
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, shardings)


def run_layout(model, variables, mesh):
  """Forward + grads and STEPS train steps on `mesh`; returns host numpy results."""
  tokens0 = jnp.zeros((1, 1), jnp.int32)
  var_sh = sharding.variable_shardings(model, mesh, tokens0)
  data_sh = sharding.data_sharding(mesh)
  tx, sched = trainer(model, variables["params"])
  state_fn = sharding.train_state_sharding(model, mesh)
  with jax.set_mesh(mesh), sharding.rules_context(mesh=mesh):
    v = place(variables, var_sh)
    local = distributed.local_rows(batch_np(0)["inputs"], data_sh)
    tokens = distributed.global_batch_from_local(local, data_sh)
    logits, tpe, bal, g = jax.jit(fwd_grad(model))(v, tokens)
    res = {"logits": distributed.gather_to_host(logits), "tpe": distributed.gather_to_host(tpe),
           "balance": distributed.gather_to_host(bal)}
    res.update({f"grad/{jax.tree_util.keystr(p)}": distributed.gather_to_host(x)
                for p, x in jax.tree_util.tree_leaves_with_path(g)})
    state0 = jax.jit(lambda vv: create_state(vv, tx, jnp.zeros((2,), jnp.uint32)))(v)
    st_sh = state_fn(jax.eval_shape(lambda: state0))
    state = jax.device_put(state0, st_sh)
    step = make_train_step(model, tx, sched, alpha=1e-3, state_sharding=st_sh, batch_sharding=data_sh)
    losses = []
    for i in range(STEPS):
      b = distributed.global_batch_from_local(distributed.local_rows(batch_np(i), data_sh), data_sh)
      state, m = step(state, b)
      losses.append(float(m["loss"]))
    res["losses"] = np.asarray(losses)
    res["bias"] = np.concatenate([distributed.gather_to_host(x).ravel()
                                  for x in jax.tree.leaves(state.router)])
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(st_sh)}
  return res, specs


def run_single(model, variables):
  tokens = jnp.asarray(batch_np(0)["inputs"])
  logits, tpe, bal, g = jax.jit(fwd_grad(model))(variables, tokens)
  res = {"logits": np.asarray(logits), "tpe": np.asarray(tpe), "balance": np.asarray(bal)}
  res.update({f"grad/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(g)})
  tx, sched = trainer(model, variables["params"])
  state = create_state(jax.tree.map(jnp.asarray, variables), tx, jnp.zeros((2,), jnp.uint32))
  step = make_train_step(model, tx, sched, alpha=1e-3)
  losses = []
  for i in range(STEPS):
    state, m = step(state, jax.tree.map(jnp.asarray, batch_np(i)))
    losses.append(float(m["loss"]))
  res["losses"] = np.asarray(losses)
  res["bias"] = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.router)])
  return res


def diffs(a, b):
  out = {}
  for k in b:
    scale = max(float(np.max(np.abs(b[k]))), 1e-30)
    out[k] = float(np.max(np.abs(np.asarray(a[k]) - b[k]))) / scale
  return out


def main():
  model = dsj.DeepSeekV3(CFG)
  variables = host_variables(model)
  if sys.argv[1] == "kernels":
    # The Pallas kernels run per device (ops.per_shard) on a mesh without an expert axis: the attention on
    # its rows and heads, the experts on its own tokens.
    kmodel = dsj.DeepSeekV3(CFG.replace(attention_impl="pallas", moe_impl="pallas", pallas_interpret=True,
                                        num_hidden_layers=1, first_k_dense_replace=0))
    variables = host_variables(kmodel)
    tokens = jnp.asarray(batch_np(0)["inputs"])
    logits, tpe, _, g = jax.jit(fwd_grad(kmodel))(variables, tokens)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    var_sh = sharding.variable_shardings(kmodel, mesh, jnp.zeros((1, 1), jnp.int32))
    with jax.set_mesh(mesh), sharding.rules_context(mesh=mesh):
      tok = jax.device_put(tokens, sharding.data_sharding(mesh))
      s_logits, s_tpe, _, s_g = jax.jit(fwd_grad(kmodel))(place(variables, var_sh), tok)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
    # The FP8 GEMM's weight gradient sums each device's tokens, then adds the partial sums over the mesh.
    from deepseek_jax.ops import fp8  # pylint: disable=g-import-not-at-top
    x = jax.random.normal(jax.random.PRNGKey(1), (512, 256))
    w = jax.random.normal(jax.random.PRNGKey(2), (256, 128))
    fp8_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fp8.fp8_matmul(x, w))), argnums=(0, 1)))
    dx, dw = fp8_grad(x, w)
    with jax.set_mesh(mesh), sharding.rules_context(mesh=mesh):
      s_dx, s_dw = fp8_grad(jax.device_put(x, sharding.data_sharding(mesh)), w)
    print(json.dumps({"logits": rel(s_logits, logits), "tpe": rel(s_tpe, tpe),
                      "grad_max": max(rel(a, b) for a, b in zip(jax.tree.leaves(s_g), jax.tree.leaves(g))),
                      "fp8_dx": rel(s_dx, dx), "fp8_dw": rel(s_dw, dw)}))
  elif sys.argv[1] == "layouts":
    ref = run_single(model, variables)
    out = {"ref_losses": ref["losses"].tolist()}
    for name, shape in LAYOUTS.items():
      res, specs = run_layout(model, variables, sharding.make_mesh(**shape))
      if len(sys.argv) > 2 and name == "data2_fsdp2_expert2":
        np.savez(sys.argv[2], **res)
      d = diffs(res, ref)
      out[name] = {"logits": d["logits"], "tpe": d["tpe"], "balance": d["balance"], "losses": d["losses"],
                   "bias": d["bias"], "grad_max": max(v for k, v in d.items() if k.startswith("grad/")),
                   "loss_abs": float(np.max(np.abs(res["losses"] - ref["losses"]))),
                   "specs": {k: [list(e) if isinstance(e, tuple) else e for e in s]
                             for k, s in specs.items()}}
    print(json.dumps(out))
  else:
    path, layout = sys.argv[2], sys.argv[3]
    res, _ = run_layout(model, variables, sharding.make_mesh(**LAYOUTS[layout]))
    if distributed.is_main_process():
      np.savez(path, **res)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count()}))
    distributed.shutdown()


if __name__ == "__main__":
  main()
