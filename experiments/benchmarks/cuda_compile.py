"""`--suite=cuda_compile`: every Pallas kernel and the GPU train step compiled for H100/H200 without a GPU.

Each case is lowered for CUDA with the kernels built for the GPU (`kernels._common.target_backend('gpu')`),
and each of its distinct kernels is verified, compiled to PTX for sm_90a and assembled by ptxas
(`deepseek_jax.analysis.cuda_compile`): the table gives shared memory (limit 232,448 B), registers and
spills per kernel. Shapes are DeepSeek-V3's; the gmm rows print the kernel's issued MMA work over the useful
FLOPs. Runs in the CUDA compile environment (`.ci/cuda_env.sh`, docs/gpu.md); elsewhere it reports that the
plugin is missing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.analysis import cuda_compile as cc

_V3 = dict(heads=128, qk=192, v=128, dc=512, dr=64)
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass
class Case:
  """A function and abstract arguments to lower for CUDA."""
  name: str
  dtype: str
  build: Callable[[], tuple]        # () -> (fn, args)
  info: dict = dataclasses.field(default_factory=dict)


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def flash_case(seq: int, dtype: str) -> Case:
  """Flash MLA forward + backward, B=1, H=128, qk 192 / v 128, causal."""
  def build():
    from kernels import mla_attention  # pylint: disable=g-import-not-at-top

    def fn(q, k, v):
      loss = lambda q, k, v: jnp.sum(mla_attention.flash_attention(q, k, v, causal=True)
                                     .astype(jnp.float32))
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    h, dqk, dv = _V3["heads"], _V3["qk"], _V3["v"]
    return fn, (_sds((1, seq, h, dqk), dtype), _sds((1, seq, h, dqk), dtype),
                _sds((1, seq, h, dv), dtype))
  return Case(f"flash_mla S={seq}", dtype, build)


def decode_case(sq: int, cache: int, dtype: str) -> Case:
  """Absorbed MLA decode, B=8, H=128, Dc=512, Dr=64."""
  def build():
    from kernels import mla_decode  # pylint: disable=g-import-not-at-top
    b, h, dc, dr = 8, _V3["heads"], _V3["dc"], _V3["dr"]

    def fn(qc, qpe, ckv, kpe, lengths):
      return mla_decode.mla_decode(qc, qpe, ckv, kpe, lengths, sm_scale=0.1)
    return fn, (_sds((b, sq, h, dc), dtype), _sds((b, sq, h, dr), dtype), _sds((b, cache, dc), dtype),
                _sds((b, cache, dr), dtype), _sds((b,), jnp.int32))
  return Case(f"mla_decode Sq={sq} T={cache}", dtype, build)


def gmm_case(k: int, n: int, dtype: str, rows: int = 65536, groups: int = 256) -> Case:
  """gmm forward + backward (dx = gmm with w transposed, dw = tgmm) at V3's routed-expert shapes."""
  def build():
    from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top

    def fn(x, w, group_sizes):
      loss = lambda x, w: jnp.sum(gm.gmm(x, w, group_sizes).astype(jnp.float32))
      return jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    return fn, (_sds((rows, k), dtype), _sds((groups, k, n), dtype), _sds((groups,), jnp.int32))
  case = Case(f"gmm+tgmm {k}->{n}", dtype, build)
  case.info["work_ratio"] = gmm_work_ratio(rows, k, n, groups, dtype)
  return case


def gmm_work_ratio(rows: int, k: int, n: int, groups: int, dtype: str) -> dict:
  """Issued MMA work over useful FLOPs of gmm / tgmm with the GPU tiles, for V3-like routing."""
  from kernels import grouped_matmul as gm  # pylint: disable=g-import-not-at-top
  sizes = v3_group_sizes(rows, groups)
  bs = gm.BlockSizes.get_default("gpu", dtype=jnp.dtype(dtype))
  return {"gmm": gm.gmm_work_ratio(sizes, k, n, bs), "tgmm": gm.tgmm_work_ratio(sizes, k, n, bs)}


def tokamax_case(dtype: str, k: int = 7168, n: int = 2048, rows: int = 65536, groups: int = 256) -> Case:
  """tokamax's ragged_dot (deepseek_jax.ops.tokamax_ragged_dot) forward at V3 expert shapes, with tokamax
  told the target is compute capability 9.0 (it asks the default device, a CPU here; its backward asks
  the device again and does not lower without a GPU, docs/gpu.md)."""
  def build():
    from tokamax._src import gpu_utils  # pylint: disable=g-import-not-at-top
    from deepseek_jax.ops import tokamax_ragged_dot as trd  # pylint: disable=g-import-not-at-top
    gpu_utils._compute_capability = lambda device=None: 9.0  # pylint: disable=protected-access

    def fn(x, w, group_sizes):
      return trd.ragged_dot(x, w, group_sizes, implementation="mosaic_gpu")
    return fn, (_sds((rows, k), dtype), _sds((groups, k, n), dtype), _sds((groups,), jnp.int32))
  return Case(f"tokamax_ragged_dot fwd {k}->{n}", dtype, build)


def v3_group_sizes(rows: int, groups: int, seed: int = 0) -> np.ndarray:
  """Rows per expert: a skewed random routing of `rows` rows over `groups` experts, 1 in 16 empty."""
  rng = np.random.default_rng(seed)
  weights = rng.gamma(4.0, size=groups)
  weights[::16] = 0.0
  sizes = np.floor(weights / weights.sum() * rows).astype(np.int64)
  sizes[np.argmax(sizes)] += rows - sizes.sum()
  return sizes.astype(np.int32)


def train_case(preset: str, dtype: str) -> Case:
  """The whole train step (loss, grads, optimizer) of a preset with the Pallas kernels."""
  def build():
    from experiments.benchmarks.common import bench_config  # pylint: disable=g-import-not-at-top
    from experiments.benchmarks.compile import abstract_step  # pylint: disable=g-import-not-at-top
    cfg = bench_config(preset, dtype=dtype, param_dtype="float32",
                       precision="bf16" if dtype == "bfloat16" else "fp32",
                       attention_impl="pallas", moe_impl="pallas", matmul_impl="xla")
    step, state, data = abstract_step(cfg, batch=2, seq_len=256)
    return step, (state, data)
  return Case(f"train_step {preset}", dtype, build)


def all_cases(which: str = "all") -> list[Case]:
  """The check's cases: 'kernels', 'train', 'all', or 'quick' (one bf16 case per kernel, tokamax, and the
  tiny preset's bf16 train step: what CI compiles whole under jax 0.11)."""
  if which == "quick":
    from deepseek_jax.ops import tokamax_ragged_dot  # pylint: disable=g-import-not-at-top
    bf = "bfloat16"
    quick = [flash_case(4096, bf), decode_case(2, 32768, bf), gmm_case(7168, 2048, bf),
             train_case("tiny", bf)]
    return quick + ([tokamax_case(bf)] if tokamax_ragged_dot.available() else [])
  cases = []
  if which in ("all", "kernels"):
    for dt in DTYPES:
      cases += [flash_case(4096, dt), flash_case(37, dt)]
      cases += [decode_case(sq, t, dt) for sq in (1, 2) for t in (4096, 32768)]
      cases += [gmm_case(7168, 2048, dt), gmm_case(2048, 7168, dt)]
  if which in ("all", "kernels"):
    from deepseek_jax.ops import tokamax_ragged_dot  # pylint: disable=g-import-not-at-top
    if tokamax_ragged_dot.available():
      cases.append(tokamax_case("bfloat16"))
  if which in ("all", "train"):
    for preset in ("tiny", "small"):
      cases += [train_case(preset, dt) for dt in DTYPES]
  return cases


def run_case(case: Case, compiler, ptxas, whole_program: bool = True) -> dict:
  """Lowers and checks one case's kernels, then (whole_program) compiles the case with XLA for an
  H100; a failure of either is reported as the case's error."""
  from kernels import _common  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.clear_caches()        # kernels traced for the CPU before must be traced anew for the GPU
  reports, error = [], ""
  try:
    with _common.target_backend("gpu"):
      fn, args = case.build()
      kernels = cc.extract_kernels(cc.lower_for_cuda(fn, *args))
    reports = cc.check_kernels(kernels, compiler, ptxas)
  except Exception as e:  # pylint: disable=broad-except
    error = "lower: " + cc._one_line(e)  # pylint: disable=protected-access
  if whole_program and not error and all(r.verified for r in reports):
    try:
      with _common.target_backend("gpu"):
        smem = cc.xla_compile(fn, *args)
      for r in reports:
        r.xla_smem_bytes = smem.get(r.name)
        if r.compiled is None and r.backend == "triton":
          r.compiled = True     # XLA compiled it (to a cubin) with the rest of the program
    except Exception as e:  # pylint: disable=broad-except
      error = "xla compile: " + cc._one_line(e)  # pylint: disable=protected-access
  rows = [dict(dataclasses.asdict(r), ok=r.ok) for r in reports]
  ok = not error and bool(rows) and all(r["ok"] for r in rows)
  return {"case": case.name, "dtype": case.dtype, "ok": ok, "error": error, "kernels": rows,
          "seconds": round(time.perf_counter() - t0, 1), **case.info}


def whole_program(case: Case, compiler, train_steps: bool = False) -> bool:
  """Whether to compile the case whole with XLA too: where no Triton compiler is exposed to Python
  (jax 0.11), tokamax's cases, and the train steps when asked (minutes each on 2 cores)."""
  return (compiler is None or case.name.startswith("tokamax")
          or (train_steps and case.name.startswith("train_step")))


def check_all(which: str = "all", log=print, train_steps_whole: bool = True) -> dict:
  """Runs every case; returns the JSON-ready result (environment, per-case rows, summary)."""
  available, why = cc.cuda_plugin_available()
  result = {"jax": jax.__version__, "smem_limit": cc.SMEM_LIMIT, "cases": []}
  if not available:
    result.update(skipped=why)
    return result
  compiler, ptxas = cc.triton_compiler(), cc.find_ptxas()
  result.update(triton_compiler=compiler is not None, ptxas=ptxas or "")
  for case in all_cases(which):
    row = run_case(case, compiler, ptxas,
                   whole_program=whole_program(case, compiler, train_steps_whole))
    result["cases"].append(row)
    log(format_rows([row]), flush=True)
  result["summary"] = {"cases": len(result["cases"]),
                       "ok": sum(r["ok"] for r in result["cases"])}
  return result


def format_rows(rows) -> str:
  """One line per kernel: case, dtype, kernel, verified/compiled, smem, regs, spills, error."""
  lines = []
  for r in rows:
    if r["error"]:
      lines.append(f"{r['case']:<28} {r['dtype']:<9} {'-':<18} FAIL {r['error']}")
    for k in r["kernels"]:
      status = "ok  " if k["ok"] else "FAIL"
      fmt = lambda v: "-" if v is None else str(v)
      lines.append(f"{r['case']:<28} {r['dtype']:<9} {k['name'][:18]:<18} {status} "
                   f"verified={int(k['verified'])} compiled={fmt(k['compiled'])} "
                   f"smem={fmt(k['smem_bytes'])} xla_smem={fmt(k['xla_smem_bytes'])} "
                   f"regs={fmt(k['registers'])} spills={fmt(k['spill_bytes'])} {k['error']}")
    if r.get("work_ratio"):
      lines.append(f"{r['case']:<28} {r['dtype']:<9} issued MMA work / useful FLOPs: "
                   + ", ".join(f"{k} {v:.3f}" for k, v in r["work_ratio"].items()))
  return "\n".join(lines)


def run(flags) -> dict:
  which = "kernels" if flags.small else "all"
  result = check_all(which)
  if "skipped" in result:
    print(f"[cuda_compile] skipped: {result['skipped']}")
  else:
    s = result["summary"]
    print(f"[cuda_compile] jax {result['jax']}: {s['ok']} of {s['cases']} cases within Hopper limits")
  return result
