"""Kernel benchmark: each Pallas kernel against its XLA counterpart (on CPU: interpret mode, not kernel speed).

On CPU the Pallas kernels run in interpret mode (`kernels._common.resolve_interpret`): the kernel body is
evaluated op by op as XLA ops, so its times show that the kernel runs, not how fast it is compiled for a
GPU; every printed line and the JSON (`interpret`, and `mode` per row) say so.

Cases (DeepSeek-V3 shapes on GPU, small shapes on CPU or with --small):
  * prefill flash attention, causal bf16, forward and forward+backward, vs the jnp reference and
    `jax.nn.dot_product_attention` (which needs Dv == Dqk, so v is zero-padded to Dqk for it);
  * absorbed MLA decode over the latent cache vs `mla_decode_reference`; GB/s counts the cache bytes
    a row must read (lengths = T: T * (Dc + Dr) * 2 bytes per row);
  * grouped matmul of one expert-parallel shard (32 local experts of 256, d=7168, F=2048; 8192 tokens
    x top-8 / 8 shards = 8192 rows, imbalanced group sizes), forward and forward+backward, vs
    `jax.lax.ragged_dot`, plus a dense bf16 matmul of the same FLOPs ("fraction of dense").
Timing: one call to compile, warm-up calls, then the median of several timed calls, each ended
with `block_until_ready`. `speedup` is XLA time / kernel time.
"""

from __future__ import annotations

import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels import grouped_matmul, mla_attention, mla_decode
from kernels._common import resolve_interpret

_GPU = dict(
    prefill=dict(b=1, s=4096, h=128, dqk=192, dv=128),
    decode=[dict(b=b, t=t, h=128, dc=512, dr=64, sq=sq)
            for b in (64, 128) for t in (4096, 32768) for sq in (1, 2)],
    gmm=dict(m=8192, e=32, d=7168, f=2048),
    runs=10,
)
_SMALL = dict(
    prefill=dict(b=1, s=256, h=4, dqk=48, dv=32),
    decode=[dict(b=b, t=512, h=8, dc=64, dr=16, sq=sq) for b in (2, 4) for sq in (1, 2)],
    gmm=dict(m=512, e=8, d=256, f=128),
    runs=3,
)


def _time_ms(fn, *args, runs: int) -> float:
  """Median wall time in ms of `fn(*args)` after compiling and warming up."""
  jax.block_until_ready(fn(*args))
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _case(name, shape, flops, nbytes, kernel, xla, args, runs):
  """Times a kernel and its XLA counterparts ({label: fn}); errors are recorded, not raised."""
  interpret = resolve_interpret(None)
  row = dict(name=name, shape=shape, mode="interpret" if interpret else "compiled", gflop=flops / 1e9,
             gbyte=nbytes / 1e9)

  def measure(fn):
    try:
      return _time_ms(fn, *args, runs=runs), None
    except Exception as e:   # A failed compile of one case must not lose the others.
      return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

  ms, err = measure(kernel)
  row["kernel_ms"] = ms
  if err:
    row["kernel_error"] = err
    traceback.print_exc()
  if ms:
    row["kernel_tflops"] = flops / ms / 1e9
    row["kernel_gbps"] = nbytes / ms / 1e6
  for label, fn in xla.items():
    xms, xerr = measure(fn)
    row[f"{label}_ms"] = xms
    if xerr:
      row[f"{label}_error"] = xerr
    if xms:
      row[f"{label}_tflops"] = flops / xms / 1e9
      if ms:
        row[f"speedup_vs_{label}"] = xms / ms
  mode = " (Pallas interpret mode)" if interpret else ""
  print(f"[bench] {name} {shape}{mode}: " + ", ".join(
      f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
  return row


def _prefill(cfg, runs):
  b, s, h, dqk, dv = cfg["b"], cfg["s"], cfg["h"], cfg["dqk"], cfg["dv"]
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, s, h, dqk), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, s, h, dqk), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, s, h, dv), jnp.bfloat16)
  flops_fwd = 2.0 * b * h * s * s * (dqk + dv) / 2          # causal: half the score matrix
  nbytes = 2.0 * (q.size + k.size + 2 * v.size)

  def dpa(q, k, v):
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dqk - dv)))
    return jax.nn.dot_product_attention(q, k, vp, is_causal=True)[..., :dv]

  fwd = {
      "kernel": jax.jit(lambda q, k, v: mla_attention.flash_attention(q, k, v, causal=True)),
      "reference": jax.jit(lambda q, k, v: mla_attention.flash_attention_reference(q, k, v)),
      "dot_product_attention": jax.jit(dpa),
  }

  def with_grad(f):
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  shape = dict(cfg, causal=True, dtype="bfloat16")
  rows = [_case("flash_attention_fwd", shape, flops_fwd, nbytes, fwd["kernel"],
                {k: f for k, f in fwd.items() if k != "kernel"}, (q, k, v), runs)]
  # Backward does 5 matmuls of the forward's size-class against the forward's 2: 3.5x in total.
  rows.append(_case("flash_attention_fwd_bwd", shape, 3.5 * flops_fwd, 3 * nbytes,
                    with_grad(fwd["kernel"]),
                    {k: with_grad(f) for k, f in fwd.items() if k != "kernel"}, (q, k, v), runs))
  return rows


def _decode(cfg, runs):
  b, t, h, dc, dr, sq = (cfg[k] for k in ("b", "t", "h", "dc", "dr", "sq"))
  ks = jax.random.split(jax.random.key(1), 4)
  q_c = jax.random.normal(ks[0], (b, sq, h, dc), jnp.bfloat16)
  q_pe = jax.random.normal(ks[1], (b, sq, h, dr), jnp.bfloat16)
  c_kv = jax.random.normal(ks[2], (b, t, dc), jnp.bfloat16)
  k_pe = jax.random.normal(ks[3], (b, t, dr), jnp.bfloat16)
  lengths = jnp.full((b,), t, jnp.int32)
  scale = 0.1352338          # DeepSeek-V3's softmax scale with YaRN (docs/reference.md)
  flops = 2.0 * b * sq * h * t * (dc + dr + dc)
  nbytes = 2.0 * b * t * (dc + dr)
  kern = jax.jit(lambda *a: mla_decode.mla_decode(*a, sm_scale=scale))
  ref = jax.jit(lambda *a: mla_decode.mla_decode_reference(*a, sm_scale=scale))
  return [_case("mla_decode", dict(cfg, dtype="bfloat16"), flops, nbytes, kern,
                {"reference": ref}, (q_c, q_pe, c_kv, k_pe, lengths), runs)]


def _group_sizes(m, e, seed=0):
  """Deterministic imbalanced sizes summing to m (Dirichlet(2) shares, as routing tends to give)."""
  share = np.random.default_rng(seed).dirichlet(np.full(e, 2.0))
  sizes = np.floor(share * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return jnp.asarray(sizes, jnp.int32)


def _gmm(cfg, runs):
  m, e, d, f = cfg["m"], cfg["e"], cfg["d"], cfg["f"]
  ks = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (e, d, f), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
  w_dense = w[0]
  gs = _group_sizes(m, e)
  flops = 2.0 * m * d * f
  nbytes = 2.0 * (x.size + w.size + m * f)
  shape = dict(cfg, dtype="bfloat16", group_sizes_min=int(gs.min()), group_sizes_max=int(gs.max()))
  kern = jax.jit(lambda x, w: grouped_matmul.gmm(x, w, gs))
  rag = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, gs))
  dense = jax.jit(lambda x, w: jnp.dot(x, w_dense, preferred_element_type=jnp.float32).astype(
      jnp.bfloat16))

  def with_grad(fn):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32)), argnums=(0, 1)))

  dense_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w).astype(jnp.float32)),
                                argnums=(0, 1)))
  rows = [_case("gmm_fwd", shape, flops, nbytes, kern, {"ragged_dot": rag, "dense_matmul": dense},
                (x, w), runs)]
  rows.append(_case("gmm_fwd_bwd", shape, 3 * flops, 3 * nbytes, with_grad(kern),
                    {"ragged_dot": with_grad(rag),
                     "dense_matmul": lambda x, w: dense_grad(x, w_dense)}, (x, w), runs))
  return rows


def run(flags) -> dict:
  """Runs every kernel case; returns {'backend', 'device', 'jax', 'small', 'results': [...]}."""
  small = bool(getattr(flags, "small", False)) or jax.default_backend() == "cpu"
  cfg = _SMALL if small else _GPU
  runs = getattr(flags, "runs", 0) or cfg["runs"]
  interpret = resolve_interpret(None)
  if interpret:
    print(f"[bench] {jax.default_backend()}: the Pallas kernels run in interpret mode (each kernel body as "
          "XLA ops); their times show that they run, not how fast they are", flush=True)
  results = _prefill(cfg["prefill"], runs)
  for c in cfg["decode"]:
    results += _decode(c, runs)
  results += _gmm(cfg["gmm"], runs)
  return dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, small=small, interpret=interpret,
              runs=runs, results=results)
