"""`--suite=train`: training-step tokens/s and MFU, ours, transformers' DeepseekV3 and MaxText side by side.

All run the same config, batch and thread count in one process: ours is the library's train step (AdamW,
clipping, balance loss, bias update), transformers' is forward + backward + torch AdamW, MaxText's is its own
jitted `train_step` set up by its own `train_utils` (`maxtext_step`; `--maxtext` picks the modes of its expert
layer, where maxtext is importable, which needs Python >= 3.12). MFU counts the model's matmul FLOPs
(`analysis.train_flops_per_token`, full attention since all compute it masked) against the matmul peak
measured in the same run in the compute dtype (`--dtype`, default the preset's float32), and on a GPU the
datasheet knows (`analysis.hardware.gpu_for_device`), in bf16 / fp16, also against its dense peak
(`mfu_vs_datasheet`). Every contender (ours, our step under the `--remat` policies, `--scan_layers` and
the `--impls` choices, e.g. `matmul_impl=xla` or, '+'-joined in one variant,
`attention_impl=host+moe_impl=host+matmul_impl=host`, transformers, MaxText) is compiled and warmed up first and
then timed in interleaved rounds, one step of each per round, so that a slow phase of a shared machine hits
all of them alike. `--ablate=PARTS` also times our
step with each part swapped for a stand-in of negligible work (`ablation`: routed_experts, attention,
shared_experts, dense_mlp) and reports each part's wall-clock cost and share of the step. `--profile=DIR`
then profiles our step (`deepseek_jax.analysis.profile`): the jax profiler trace (TensorBoard / Perfetto),
the optimized HLO, and each op's milliseconds by phase, module and op kind.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from deepseek_jax import DeepSeekV3
from deepseek_jax.analysis.flops import train_flops_per_token
from deepseek_jax.analysis.hardware import gpu_for_device
from deepseek_jax.ops import impls as impls_lib
from deepseek_jax.training.optimizer import Schedules, make_optimizer
from deepseek_jax.training.state import create_state
from deepseek_jax.training.step import make_train_step
from experiments.benchmarks import ablation, maxtext_step
from experiments.benchmarks.common import bench_config, interleaved, machine, matmul_peak


def _ours(cfg, batch, seq_len):
  """(one blocked train step of ours as a thunk, compile + first-step seconds)."""
  model = DeepSeekV3(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  variables = model.init(jax.random.PRNGKey(0), data["inputs"])
  tx = make_optimizer(variables["params"])
  schedules = Schedules(steps=1000, lr=1e-3)
  step = make_train_step(model, tx, schedules, alpha=1e-4, donate=False)
  state = create_state(variables, tx, jax.random.PRNGKey(1))
  t0 = time.perf_counter()
  jax.block_until_ready(step(state, data))
  compile_s = time.perf_counter() - t0
  return (lambda: jax.block_until_ready(step(state, data)[1]["loss"])), compile_s, (step, state, data)


def _transformers(cfg, batch, seq_len, threads):
  """(one train step of transformers' DeepseekV3ForCausalLM as a thunk, info), or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf = cfg.to_hf()
  hf.pop("architectures")
  config = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k != "model_type"})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  try:
    config._experts_implementation = "grouped_mm"  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass
  model = transformers.DeepseekV3ForCausalLM(config).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
  inputs, labels = ids[:, :-1], ids[:, 1:]

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  step()
  a = torch.randn(2048, 2048)
  torch.mm(a, a)
  t0 = time.perf_counter()
  for _ in range(3):
    torch.mm(a, a)
  torch_peak = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0)
  return step, {"experts_implementation": getattr(config, "_experts_implementation", None),
                "torch_matmul_peak_flops": torch_peak, "transformers": transformers.__version__,
                "torch": torch.__version__}


def run(flags) -> dict:
  """Runs the suite; see the module docstring."""
  import os  # pylint: disable=g-import-not-at-top
  preset = getattr(flags, "preset", "") or "bench-6.5m"
  dtype = getattr(flags, "dtype", "")
  cfg = bench_config(preset, **({"dtype": dtype} if dtype else {}))
  batch = getattr(flags, "batch", 0) or 8
  seq_len = getattr(flags, "seq_len", 0) or 256
  runs = flags.runs or 5
  threads = os.cpu_count()
  tokens = batch * seq_len
  flops_tok = train_flops_per_token(cfg, seq_len, causal=False)
  train_flops = flops_tok.model if hasattr(flops_tok, "model") else float(flops_tok)
  peak = matmul_peak(dtype=jnp.dtype(cfg.dtype))
  gpu = gpu_for_device(jax.devices()[0].device_kind) if jax.default_backend() == "gpu" else None
  half = cfg.dtype in ("bfloat16", "float16")
  datasheet = gpu.peak_flops("bf16") if gpu is not None and half else None
  thunks, compile_s = {}, {}
  thunks["ours"], compile_s["ours"], ours_step = _ours(cfg, batch, seq_len)
  variants = {f"remat:{p}": dataclasses.replace(cfg, remat_policy=p)
              for p in (getattr(flags, "remat", "") or "").split(",") if p and p != cfg.remat_policy}
  for name, fields in _impl_choices(getattr(flags, "impls", "") or "").items():
    variants[name] = dataclasses.replace(cfg, **fields)
  if getattr(flags, "scan_layers", False) and not cfg.scan_layers:
    variants["scan_layers"] = dataclasses.replace(cfg, scan_layers=True)
  for name, variant in variants.items():
    thunks[name], compile_s[name], _ = _ours(variant, batch, seq_len)
  ablated = ablation.parts(getattr(flags, "ablate", "") or "")
  for part in ablated:
    with ablation.without(part):   # _ours compiles and runs the step once, inside the stand-in
      thunks[f"without:{part}"], _, _ = _ours(cfg, batch, seq_len)
  hf = _transformers(cfg, batch, seq_len, threads) if jax.default_backend() == "cpu" else None
  if hf is not None:
    thunks["transformers"], hf_info = hf
  mt_variants = [v for v in (getattr(flags, "maxtext", "dense") or "").split(",") if v and v != "none"]
  mt_info = {}
  if mt_variants and maxtext_step.available():
    for v in mt_variants:
      t0 = time.perf_counter()
      thunks[f"maxtext:{v}"], mt_info[v] = maxtext_step.maxtext_train_step(cfg, batch, seq_len, v)
      mt_info[v]["compile_s"] = time.perf_counter() - t0
  timed = interleaved(thunks, runs)
  ours = timed["ours"]

  def rates(name, **extra):
    """A contender's timings with its tokens/s and MFU against the measured peak."""
    t = timed[name]
    return dict(t, tokens_per_s=tokens / t["median_s"], mfu=train_flops * tokens / t["median_s"] / peak,
                **extra)

  result = {"suite": "train", "machine": machine(), "config": preset, "batch": batch, "seq_len": seq_len,
            "train_flops_per_token": train_flops, "jax_matmul_peak_flops": peak,
            "ours": rates("ours", compile_s=compile_s["ours"], impls=impls_lib.resolve(cfg).describe(),
                          remat_policy=cfg.remat_policy, dtype=cfg.dtype)}
  if datasheet:
    result["datasheet_peak_flops"] = datasheet
    result["ours"]["mfu_vs_datasheet"] = train_flops * tokens / ours["median_s"] / datasheet
  remat = {name.split(":", 1)[1]: rates(name, compile_s=compile_s[name])
           for name in variants if name.startswith("remat:")}
  if remat:
    result["remat"] = remat
  impls = {name.split(":", 1)[1]: rates(name, compile_s=compile_s[name],
                                        vs_ours=ours["median_s"] / timed[name]["median_s"],
                                        impls=impls_lib.resolve(variants[name]).describe())
           for name in variants if name.startswith("impl:")}
  if any(v == "host" for name in variants if name.startswith("impl:") for v in _impl_values(variants[name])):
    from kernels import host_build  # pylint: disable=g-import-not-at-top
    result["host_blas"] = host_build.blas()
  if impls:
    result["impls"] = impls
  if "scan_layers" in variants:
    result["scan_layers"] = rates("scan_layers", compile_s=compile_s["scan_layers"],
                                  vs_unrolled=ours["median_s"] / timed["scan_layers"]["median_s"])
  if ablated:
    result["ablation"] = {
        part: dict(timed[f"without:{part}"], cost_s=ours["median_s"] - timed[f"without:{part}"]["median_s"],
                   share=1.0 - timed[f"without:{part}"]["median_s"] / ours["median_s"])
        for part in ablated}
  if hf is not None:
    result["transformers"] = rates("transformers", **hf_info)
    result["speedup_vs_transformers"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    for name, row in impls.items():
      row["speedup_vs_transformers"] = row["tokens_per_s"] / result["transformers"]["tokens_per_s"]
  if mt_info:
    result["maxtext"] = {v: rates(f"maxtext:{v}", **info) for v, info in mt_info.items()}
    result["speedup_vs_maxtext"] = {v: timed[f"maxtext:{v}"]["median_s"] / ours["median_s"] for v in mt_info}
  elif mt_variants:
    result["maxtext"] = "not importable here (bash experiments/maxtext_env.sh makes its Python 3.12 environment)"
  if getattr(flags, "profile", ""):
    try:   # the profile is extra: a trace that cannot be read must not lose the timings
      result["profile"] = _profile(ours_step, flags.profile)
    except (RuntimeError, OSError, ValueError) as err:
      result["profile_error"] = f"{type(err).__name__}: {err}"
  return result


_IMPL_FIELDS = ("attention_impl", "decode_impl", "moe_impl", "matmul_impl")


def _impl_values(cfg) -> tuple:
  return tuple(getattr(cfg, f) for f in _IMPL_FIELDS)


def _impl_choices(spec: str) -> dict:
  """'field=value[+field=value...],...' (fields of _IMPL_FIELDS) as {'impl:<item>': {field: value, ...}}: one
  variant per comma-separated item, its '+'-joined choices together."""
  out = {}
  for item in filter(None, (x.strip() for x in spec.split(","))):
    fields = {}
    for part in (p.strip() for p in item.split("+")):
      field, sep, value = part.partition("=")
      if not sep or field not in _IMPL_FIELDS or not value:
        raise ValueError(f"--impls: {part!r} is not one of {_IMPL_FIELDS}=<value>")
      fields[field] = value
    out[f"impl:{item.replace(' ', '')}"] = fields
  return out


def _profile(step_and_args, out_dir: str) -> dict:
  """Profiles our step (`analysis.profile`): the trace under out_dir/trace, the optimized HLO in
  out_dir/train_step.hlo.txt, every op's time in out_dir/ops.json and the tables in out_dir/summary.txt,
  which also go to stderr."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from deepseek_jax.analysis import profile  # pylint: disable=g-import-not-at-top
  step, state, data = step_and_args
  p = profile.profile_ops(step, state, data, runs=3, trace_dir=os.path.join(out_dir, "trace"),
                          hlo_path=os.path.join(out_dir, "train_step.hlo.txt"))
  profile.save(p, out_dir)
  print(profile.summarize(p), file=sys.stderr, flush=True)
  d = p.to_dict(top=10)
  return {"dir": out_dir, **{k: d[k] for k in ("wall_ms", "busy_ms", "lanes", "utilization", "by_phase")},
          "by_module": d["by_module"][:15], "ops": d["ops"]}
