"""`--suite=moe`: routed-expert dispatch strategies against a dense MLP of the same active FLOPs.

For each (tokens T, experts E, top-k K) the suite times forward + backward of the routed experts
(`ops.moe_dispatch`) with every strategy - dense (every expert on every token), host (BLAS GEMMs per
expert in an XLA FFI call, the opt-in CPU backend where it builds: `kernels.host_moe`), blocked (what
'auto' runs on CPU), the blocked layout as one chain of ops (`chains=1`, on CPU), sort + `jax.lax.ragged_dot`,
sort + Pallas `gmm` (GPU, or small shapes in interpret mode), and a capacity-factor layout (drops
overflow; for comparison; the row says what fraction of the assignments it dropped) - next to a SwiGLU
MLP of width K x F (the same active FLOPs).  The router is random, which loads the experts evenly (max /
mean load `routing_imbalance` about 1.1 at E16); `--moe_imbalance=1.6` also times every case with a
per-expert bias that skews the load to that max / mean, as unevenly as a freshly initialised model
routes.  Every contender of a case is compiled and warmed up first and then timed in interleaved rounds
(those over `SLOW` x the dense MLP apart, after the others).  Prints JSON with times and ratios and
writes a bar plot next to `--json` (or to bench_moe.png).
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp

from deepseek_jax.ops import moe_dispatch
from kernels import host_moe
from experiments.benchmarks.common import interleaved, machine, time_fn


SLOW = 10.0   # contenders slower than this many dense MLPs are timed apart, after the others


def route(logits, k: int):
  """(weights, expert ids) [T, K]: the top-k of the sigmoid scores, as the suite routes."""
  return jax.lax.top_k(jax.nn.sigmoid(logits), k)


def load_imbalance(idx, num_experts: int) -> float:
  """max / mean assignments per expert of a [T, K] routing."""
  load = jnp.bincount(idx.reshape(-1), length=num_experts)
  return float(jnp.max(load) / jnp.mean(load))


def skew_bias(x, router, k: int, target: float):
  """A per-expert bias [E] (a linear ramp over the experts, its spread found by bisection) that makes the
  top-k of sigmoid(x @ router + bias) load the experts with max / mean = `target`, or zeros when the
  unbiased routing is already at least that imbalanced.  Fresh models route this unevenly: the bench-6.5m
  config's MoE layers start at 1.4-1.7."""
  e = router.shape[1]
  if target > e / k:
    raise ValueError(f"--moe_imbalance={target} is out of reach: with {e} experts and top-{k} the most "
                     f"loaded expert gets at most every token, {e / k:g}x the mean")
  ramp = jnp.linspace(-1.0, 1.0, e)
  logits = x @ router
  imbalance = lambda spread: load_imbalance(route(logits + spread * ramp, k)[1], e)
  if imbalance(0.0) >= target:
    return jnp.zeros((e,))
  lo, hi = 0.0, 1.0
  while imbalance(hi) < target and hi < 64:
    lo, hi = hi, 2 * hi
  for _ in range(30):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if imbalance(mid) < target else (lo, mid)
  return hi * ramp


def _case(t, e, k, d, f, strategies, runs, imbalance: float = 0.0):
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  x = jax.random.normal(keys[0], (t, d))
  router = jax.random.normal(keys[1], (d, e)) / d ** 0.5
  bias = skew_bias(x, router, k, imbalance) if imbalance > 0 else jnp.zeros((e,))
  wg = jax.random.normal(keys[2], (e, d, f)) / d ** 0.5
  wu = jax.random.normal(keys[3], (e, d, f)) / d ** 0.5
  wd = jax.random.normal(keys[4], (e, f, d)) / f ** 0.5
  dense_w = [jax.random.normal(kk, s) / s[0] ** 0.5 for kk, s in
             zip(keys[5:8], [(d, k * f), (d, k * f), (k * f, d)])]

  def routed(fn):
    def loss(x, wg, wu, wd):
      w, idx = route(x @ router + bias, k)
      return jnp.sum(fn(x, idx, w, wg, wu, wd) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  def mlp_loss(x, a, b, c):
    return jnp.sum(((jax.nn.silu(x @ a) * (x @ b)) @ c) ** 2)

  fns = {
      "dense": lambda *a: moe_dispatch.dense_experts(*a),
      "host": lambda *a: host_moe.host_experts(*a),
      "blocked": lambda *a: moe_dispatch.blocked_experts(*a),
      "blocked_one_chain": lambda *a: moe_dispatch.blocked_experts(*a, chains=1),
      "ragged_dot": lambda *a: moe_dispatch.sorted_experts(*a, impl="xla"),
      "pallas_gmm": lambda *a: moe_dispatch.sorted_experts(*a, impl="pallas"),
      "capacity_1.25": lambda *a: moe_dispatch.capacity_experts(*a, capacity_factor=1.25)[0],
  }
  mlp = jax.jit(jax.value_and_grad(mlp_loss, argnums=(0, 1, 2, 3)))
  thunks = {"dense_mlp": lambda: jax.block_until_ready(mlp(x, *dense_w))}
  warm = {"dense_mlp": time_fn(thunks["dense_mlp"], runs=1)["median_s"]}
  w0, idx0 = route(x @ router + bias, k)
  row = {"tokens": t, "experts": e, "top_k": k, "d": d, "f": f,
         "active_flops_fwd_bwd": 3 * 3 * 2 * t * d * k * f,
         "routing_imbalance": load_imbalance(idx0, e)}
  if "capacity_1.25" in strategies:   # what the capacity layout gives up for its speed
    row["capacity_1.25_dropped"] = float(moe_dispatch.capacity_experts(
        x, idx0, w0, wg, wu, wd, capacity_factor=1.25)[1])
  for name in strategies:
    try:
      step = routed(fns[name])
      jax.block_until_ready(step(x, wg, wu, wd))   # compile and warm up before any timing
      thunks[name] = lambda step=step: jax.block_until_ready(step(x, wg, wu, wd))
      warm[name] = time_fn(thunks[name], runs=1, warmup=0)["median_s"]
    except Exception as err:  # pylint: disable=broad-except
      row[name + "_error"] = f"{type(err).__name__}: {str(err)[:200]}"
  # The close contenders go in interleaved rounds (one call of each per round, so that a slow phase of the
  # machine hits all alike); those over SLOW x the dense MLP are timed after them, so that their
  # seconds-long calls do not sit between the calls being compared.
  slow = [n for n in thunks if warm[n] > SLOW * warm["dense_mlp"]]
  timed = interleaved({n: f for n, f in thunks.items() if n not in slow}, runs)
  timed.update(interleaved({n: thunks[n] for n in slow}, min(runs, 3)) if slow else {})
  base = timed.pop("dense_mlp")["median_s"]
  row["dense_mlp_s"] = base
  for name, r in timed.items():
    row[name + "_s"] = r["median_s"]
    row[name + "_vs_dense_mlp"] = r["median_s"] / base
  return row


def _plot(rows, strategies, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  labels = [f"T{r['tokens']} E{r['experts']} K{r['top_k']} load x{r['routing_imbalance']:.2f}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)) + 1.5, 4))
  width = 0.8 / len(strategies)
  for i, name in enumerate(strategies):
    vals = [r.get(name + "_vs_dense_mlp", float("nan")) for r in rows]
    ax.bar([j + i * width for j in range(len(rows))], vals, width, label=name)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(1.5, color="r", lw=0.8, ls="--", label="1.5x target")
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, rotation=30, ha="right")
  ax.set_ylabel("time / dense MLP of equal active FLOPs")
  ax.set_yscale("log")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def run(flags) -> dict:
  """Runs the suite; see the module docstring."""
  gpu = jax.default_backend() == "gpu"
  small = flags.small or not gpu
  runs = flags.runs or (7 if small else 10)
  if gpu and not flags.small:
    d, f, grid = 2048, 1024, list(itertools.product([4096, 16384], [64, 256], [4, 8]))
    strategies = ["dense", "blocked", "ragged_dot", "pallas_gmm", "capacity_1.25"]
  else:
    d, f, grid = 256, 128, list(itertools.product([2048], [16, 64], [2, 4, 8]))
    strategies = ["dense", "blocked", "blocked_one_chain", "ragged_dot", "capacity_1.25"]
    if host_moe.available():
      strategies.insert(1, "host")
  rows = [_case(t, e, k, d, f, strategies, runs) for t, e, k in grid]
  skew = float(getattr(flags, "moe_imbalance", 0.0) or 0.0)
  if skew > 0:
    rows += [_case(t, e, k, d, f, strategies, runs, imbalance=skew) for t, e, k in grid]
  path = (os.path.splitext(flags.json)[0] + ".png") if flags.json else "bench_moe.png"
  return {"suite": "moe", "machine": machine(), "rows": rows, "plot": _plot(rows, strategies, path)}
