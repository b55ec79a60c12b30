"""The training loop behind `python -m experiments.train`.

`train(config, workdir)`:
  1. checks the experiment config (optimizer values included), builds the ModelConfig, locks the workdir
     (`rundir.RunLock`: a second trainer on it refuses) and checks that the workdir holds this run
     (`rundir.check_same_run` against workdir/experiment_config.json); problems raise UserError;
  2. builds the mesh and the datasets (`deepseek_jax.data.build_datasets`);
  3. restores the newest intact checkpoint of workdir/checkpoints (train state + data iterator position;
     damaged newer ones are renamed '<step>.damaged'), else initializes (or loads `init_from`); checkpoints
     of which none can be read raise CheckpointError and nothing in the workdir is changed;
  4. prints the workdir, the resolved config (saved as workdir/experiment_config.json), the parameter
     counts, devices and mesh, and saves the tokenizer and the HF config.json;
  5. loops: next global batch (this process's rows, assembled into one sharded array) -> jitted train step ->
     metrics every log_every steps (a line per log step when progress is on and stderr is no terminal,
     else a progress bar) -> held-out loss and bits per byte every eval_every steps -> checkpoint
     every checkpoint_every steps; the steps of `config.profile` (from start_step, `steps` of them) under
     the jax profiler, folded onto the model's modules into workdir/profile (`analysis.profile`);
  6. stops at `steps`, on SIGTERM/SIGINT, or after max_bad_steps consecutive non-finite steps - always with
     a checkpoint, never of a non-finite state - and at the end of a finished run prints a few sampled
     lines of text. A run whose every step since its start was non-finite raises TrainingDiverged.
The same workdir resumes exactly: same batches, same losses.

Sharding (`deepseek_jax.sharding`): the mesh has the axes data, fsdp, expert, tensor (`config.mesh`); the
train state is laid out by the logical-axis rules (`sharding.train_state_sharding`: parameters and their
AdamW moments split over fsdp, routed experts over expert, heads and hidden widths over tensor), the batch
rows over data x fsdp x expert (`sharding.data_sharding`).  Everything that traces the model runs under
`jax.set_mesh(mesh)` and `sharding.rules_context(mesh=mesh)`: the first makes the MoE layers take the
expert-parallel (all-to-all) path, the second makes the model's activation constraints effective.

Multi-process runs (`deepseek_jax.distributed.initialize` first): every process runs this same loop on its
own rows of each batch; checkpoints are written and read by all of them, metrics, TensorBoard, the progress
bar, the tokenizer and the samples file by process 0 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import distributed
from deepseek_jax import sharding as sharding_lib
from deepseek_jax.analysis import profile as profile_lib
from deepseek_jax.model import DeepSeekV3, to_layer_layout
from deepseek_jax.training import rundir
from deepseek_jax.training.checkpoint import Checkpointer
from deepseek_jax.training.config import model_config
from deepseek_jax.training.errors import CheckpointError, UserError
from deepseek_jax.training.metrics import MetricsWriter
from deepseek_jax.training.optimizer import check_optimizer_config, make_optimizer, schedules_from_config
from deepseek_jax.training.sample import sample_text
from deepseek_jax.training.state import init_state
from deepseek_jax.training.step import make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
  """Raised after max_bad_steps consecutive non-finite steps (a checkpoint was saved first), when every step
  since the start was non-finite, or when the state to save holds non-finite values (not saved)."""


def _check_config(config) -> None:
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
    v = config[name]
    if not isinstance(v, int) or v < 1:
      raise UserError(f"config.{name}={v!r} must be a positive integer")
  v = config.max_to_keep
  if not isinstance(v, int) or v < 0:
    raise UserError(f"config.max_to_keep={v!r} must be a non-negative integer (0 = keep every checkpoint)")
  for name in ("log_every", "checkpoint_every", "eval_every", "max_bad_steps"):
    v = config[name]
    if not isinstance(v, int) or v < 0:
      raise UserError(f"config.{name}={v!r} must be a non-negative integer (0 = never)")
  for name in ("start_step", "steps"):
    v = config.profile[name]
    if not isinstance(v, int) or v < 0:
      raise UserError(f"config.profile.{name}={v!r} must be a non-negative integer")
  if config.optimizer.mu_dtype not in ("float32", "bfloat16"):
    raise UserError(f"config.optimizer.mu_dtype={config.optimizer.mu_dtype!r}: expected 'float32' or "
                    "'bfloat16'")
  check_optimizer_config(config)


_finite_flags = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])


def _nonfinite_leaf(tree) -> Optional[str]:
  """The path of the first floating-point array of `tree` holding a NaN or an infinity, else None."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  floats = [(kp, x) for kp, x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  if not floats:
    return None
  flags = _finite_flags([x for _, x in floats])
  for (kp, _), ok in zip(floats, flags):
    if not bool(np.asarray(ok.addressable_data(0))):
      return jax.tree_util.keystr(kp)
  return None


def _host_int(x) -> int:
  """A replicated scalar array as a Python int (multi-process arrays too)."""
  return int(np.asarray(x.addressable_data(0)))


def _describe(workdir: str, current: dict, cfg, mesh) -> None:
  """Prints what the run is: workdir, resolved config, parameter counts, devices and mesh."""
  from deepseek_jax.analysis.params import count_params  # pylint: disable=g-import-not-at-top
  counts = count_params(cfg)
  print(f"workdir: {os.path.abspath(workdir)}")
  print(f"experiment config (saved as {rundir.CONFIG_FILE}):")
  for section, value in current.items():
    if isinstance(value, dict):
      print(f"  {section}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in value.items()))
    else:
      print(f"  {section}: {json.dumps(value)}")
  print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token, {counts['mtp']:,} in "
        "the MTP modules")
  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}) in "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}"
        + ("; optimizer state also split over 'data' (ZeRO-1)" if current.get("zero1") else ""), flush=True)


def _signal_guard():
  """Context manager installing SIGTERM / SIGINT handlers that set an event (main thread only)."""
  stop = threading.Event()

  @contextlib.contextmanager
  def guard():
    if threading.current_thread() is not threading.main_thread():
      yield stop
      return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):  # pylint: disable=unused-argument
      stop.set()

    for s in old:
      signal.signal(s, handler)
    try:
      yield stop
    finally:
      for s, h in old.items():
        signal.signal(s, h)

  return guard()


def load_init_variables(path: str, abstract_variables: dict, mesh=None, cfg=None) -> dict:
  """Variables {'params', 'router'} of a converted checkpoint, checked against the model's shapes.

  Uses `deepseek_jax.interop` when it offers an orbax loader (`load_orbax(path, mesh=) -> (cfg, variables)`);
  else reads an orbax PyTree checkpoint directory holding {'params', 'router'}.

  Args:
    path: the checkpoint directory.
    abstract_variables: the model's variables as ShapeDtypeStructs (from `jax.eval_shape(model.init, ...)`).
    mesh: restore straight onto this mesh, laid out by the logical-axis rules (every process reads only its
      shards); None: the default device.
    cfg: the model's ModelConfig: per-layer checkpoints are stacked for `scan_layers` (`to_layer_layout`).
  Returns:
    The variables, cast to the model's dtypes.
  Raises:
    UserError: missing directory, unreadable checkpoint, or a structure / shape mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from deepseek_jax import interop  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UserError(f"--init_from={path}: no such directory")
  loader = getattr(interop, "load_orbax", None)
  try:
    if loader is not None:
      _, variables = loader(path, mesh=mesh)
    else:
      variables = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--init_from={path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
  variables = {"params": variables.get("params"), "router": variables.get("router", {}) or {}}
  if variables["params"] is None:
    raise UserError(f"--init_from={path}: the checkpoint holds no 'params'")
  if cfg is not None:
    variables = to_layer_layout(cfg, variables, donate=True)
  want = jax.tree_util.tree_structure(abstract_variables)
  got = jax.tree_util.tree_structure(variables)
  if want != got:
    raise UserError(f"--init_from={path}: the checkpoint's variables do not match the model config "
                    f"(expected {want.num_leaves} arrays in the model's layout, got {got.num_leaves})")
  out = []
  for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(abstract_variables)[0],
                        jax.tree.leaves(variables)):
    if tuple(a.shape) != tuple(np.shape(b)):
      raise UserError(f"--init_from={path}: {jax.tree_util.keystr(kp)} has shape {np.shape(b)}, the model "
                      f"expects {a.shape}")
    out.append(b if getattr(b, "dtype", None) == a.dtype else jnp.asarray(b, a.dtype))
  return jax.tree_util.tree_unflatten(want, out)


def _global_batch(local: dict, sharding, global_rows: int) -> dict:
  return distributed.global_batch_from_local(local, sharding, global_rows)


def make_mesh(mesh_config):
  """The run's mesh from `config.mesh` ({data, fsdp, expert, tensor}, -1 = the remaining devices).

  Args:
    mesh_config: the `config.mesh` ConfigDict (or a dict).
  Returns:
    jax.sharding.Mesh over all devices of all processes.
  Raises:
    UserError: sizes that do not fit the device count (the message names them).
  """
  sizes = dict(mesh_config)
  unknown = set(sizes) - set(sharding_lib.MESH_AXES)
  if unknown:
    raise UserError(f"config.mesh: unknown axes {sorted(unknown)}; expected {list(sharding_lib.MESH_AXES)}")
  try:
    return sharding_lib.make_mesh(**sizes)
  except sharding_lib.MeshError as e:
    raise UserError(str(e)) from e


def data_parallel_size(mesh) -> int:
  """Devices a batch is split over: data x fsdp x expert (the rows of `sharding.data_sharding`)."""
  return math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)


def data_shard(batch_sharding, global_rows: int) -> tuple[int, int]:
  """Which block of a global batch this process feeds: (index, count) for the data iterators.

  Processes whose devices differ only along unbatched axes (tensor) hold the same rows and read the same
  block; `count` is the number of distinct blocks (the process count when every process holds its own).

  Args:
    batch_sharding: the batch sharding.
    global_rows: rows of a global batch (a multiple of the data-parallel size).
  Returns:
    (index, count) with this process's rows = [index * global_rows / count, (index + 1) * ...).
  """
  try:
    rows = distributed.local_batch_slice(global_rows, batch_sharding)
  except ValueError as e:
    raise UserError(f"mesh: {e}") from e
  n = rows.stop - rows.start
  if global_rows % n or rows.start % n:
    raise UserError(f"mesh: process {jax.process_index()} holds rows {rows.start}:{rows.stop} of a batch of "
                    f"{global_rows}, not one of equal blocks")
  return rows.start // n, global_rows // n


def _scalars(metrics: dict) -> dict:
  """Host copies of the step metrics, per-layer vectors summarized."""
  m = jax.device_get(metrics)
  out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  imb = np.asarray(m["imbalance"])
  if imb.size:
    out["imbalance"] = imb.tolist()
    out["imbalance_max"] = float(imb.max())
    out["imbalance_mean"] = float(imb.mean())
  out["skipped"] = int(out["skipped"])
  out["bad_streak"] = int(out["bad_streak"])
  return out


def evaluate(eval_step, state, tokens, seq_len: int, batch: int, max_batches: int, sharding) -> float:
  """Mean next-token cross-entropy (nats) over the first `max_batches` global batches of a held-out stream.

  Every process calls it (the step is SPMD); each reads its own rows of every batch.

  Args:
    eval_step: from `make_eval_step`.
    state: the TrainState.
    tokens: 1-D held-out stream.
    seq_len: tokens per row.
    batch: global rows per batch.
    max_batches: batches to evaluate.
    sharding: the batch sharding.
  Returns:
    The mean loss.
  """
  from deepseek_jax.data import sequential_batches  # pylint: disable=g-import-not-at-top
  index, count_blocks = data_shard(sharding, batch)
  total = count = 0.0
  for local in sequential_batches(tokens, seq_len, batch, index, count_blocks, max_batches=max_batches):
    s, n = eval_step(state, _global_batch(local, sharding, batch))
    total += float(s)
    count += float(n)
  return total / max(count, 1.0)


def train(config, workdir: str, *, init_from: Optional[str] = None) -> dict[str, Any]:
  """Runs (or resumes) one experiment.

  Args:
    config: experiment ConfigDict (`deepseek_jax.training.config.default_config` schema).
    workdir: run directory (checkpoints/, metrics.jsonl, tensorboard/, tokenizer/, samples.txt, profile/,
      experiment_config.json, config.json, train.lock).
    init_from: directory of a converted checkpoint to start from (ignored when workdir has a checkpoint).
  Returns:
    Summary: {'step', 'first_loss', 'last_loss' (the objective), 'first_ce', 'last_ce' (train
    cross-entropy), 'eval_loss' (held-out cross-entropy), 'eval_bpb', 'tokens_per_sec', 'wall_s',
    'stopped' ('done' | 'signal'), 'samples'}, and 'profile' (its directory) when steps were profiled.
  Raises:
    UserError: a problem with the config, the data, the devices or the workdir (another trainer holds it, it
      holds a different run); CheckpointError (a UserError): no checkpoint can be read, or one cannot be
      written.
    TrainingDiverged: max_bad_steps consecutive non-finite steps, every step non-finite, or a non-finite
      state to save.
  """
  t_start = time.time()
  _check_config(config)
  cfg = model_config(config)
  try:
    schedules = schedules_from_config(config)
  except ValueError as e:
    raise UserError(f"config: {e}") from e
  # Only process 0 locks: the processes of one multi-process run share the workdir.
  lock = rundir.RunLock(workdir) if distributed.is_main_process() else None
  try:
    current = rundir.resolved_config(config, cfg)
    rundir.check_same_run(workdir, current)
    return _train(config, workdir, init_from, cfg, schedules, current, t_start)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, init_from, cfg, schedules, current, t_start) -> dict[str, Any]:
  """`train` once the config is checked and the workdir locked."""
  from deepseek_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(config.mesh)
  dp = data_parallel_size(mesh)
  accum = int(config.grad_accum)
  # Every microbatch splits evenly over the data-parallel devices (and so over the processes feeding them).
  quantum = dp * accum
  if config.batch_size % quantum:
    raise UserError(f"config.batch_size={config.batch_size} does not split over the data axes: it must be a "
                    f"multiple of data x fsdp x expert = {dp} (times grad_accum = {accum}) = {quantum}")
  seq_len = int(config.seq_len)
  if seq_len > cfg.max_position_embeddings:
    raise UserError(f"config.seq_len={seq_len} exceeds model.max_position_embeddings="
                    f"{cfg.max_position_embeddings}")
  try:
    ds = data_lib.build_datasets(config.data.path or "", config.data.tokenizer, seq_len=seq_len,
                                 cache_dir=config.data.cache_dir or None, vocab_size=cfg.vocab_size)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"data: {e}") from e
  is_main = distributed.is_main_process()

  model = DeepSeekV3(cfg)
  o = config.optimizer

  def tx_factory(params):
    return make_optimizer(params, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                          clip_norm=o.clip_norm, mu_dtype=o.mu_dtype, decay_embeddings=o.decay_embeddings)

  sharding_fn = sharding_lib.train_state_sharding(model, mesh, zero1_axes=sharding_lib.ZERO1_AXES if config.zero1 else ())
  batch_sharding = sharding_lib.data_sharding(mesh)
  data_index, data_count = data_shard(batch_sharding, int(config.batch_size))
  rng = jax.random.PRNGKey(int(config.seed))
  # Every process opens the same checkpoints: orbax writes and reads each process's shards.
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.max_to_keep) or None)
  writer = None
  try:
    with sharding_lib.use_mesh(mesh):
      abstract, tx, state_shardings = init_state(model, tx_factory, rng, seq_len, sharding_fn,
                                                 abstract_only=True)

      def unusable(state):
        bad = _nonfinite_leaf(state)
        return None if bad is None else f"non-finite values in {bad}"

      restored = ckpt.restore_latest(abstract, check=unusable)
    if restored is not None and ckpt.damaged:
      # Newer damaged steps would shadow the ones this run writes again: renamed, never deleted.
      if is_main:
        for s in ckpt.damaged:
          print(f"moved damaged checkpoint {ckpt.directory}/{s} to {ckpt.set_aside(s)}", flush=True)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("deepseek_jax.training.set_aside")
      ckpt.reload()
    variables = None
    if restored is None and init_from:
      # Outside the ambient mesh: orbax places each array on the mesh's NamedShardings itself.
      abstract_vars = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32)), rng)
      variables = load_init_variables(init_from, abstract_vars, mesh=mesh, cfg=model.cfg)
    if is_main:
      _describe(workdir, current, cfg, mesh)
      rundir.save_config(workdir, current)
      ds.tokenizer.save(os.path.join(workdir, "tokenizer"))
      # The model of the run in the HF layout, so that generation needs only the workdir.
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    with sharding_lib.use_mesh(mesh):
      data_state = None
      if restored is not None:
        start_step, state, meta = restored
        data_state = meta.get("data")
        if is_main:
          print(f"resumed from {ckpt.directory}/{start_step}", flush=True)
      else:
        state, tx, state_shardings = init_state(model, tx_factory, rng, seq_len, sharding_fn,
                                                variables=variables)
        start_step = 0
    skipped_at_start = _host_int(state.skipped)

    batches = data_lib.TokenBatches(ds.train, seq_len, int(config.batch_size), seed=int(config.seed),
                                    process_index=data_index, process_count=data_count, state=data_state)
    train_step = make_train_step(model, tx, schedules, alpha=float(config.balance.alpha), grad_accum=accum,
                                 state_sharding=state_shardings, batch_sharding=batch_sharding)
    eval_step = make_eval_step(model, state_sharding=state_shardings, batch_sharding=batch_sharding)
    eval_batch = int(config.batch_size) // accum
    writer = MetricsWriter(workdir, enabled=is_main)
    return _loop(config, workdir, model, ds, ckpt, writer, batches, train_step, eval_step, schedules, state,
                 start_step, skipped_at_start, quantum, seq_len, eval_batch, batch_sharding, mesh, is_main,
                 t_start)
  except OSError as e:  # writing metrics, the tokenizer, samples... (a full disk)
    raise UserError(f"cannot write {e.filename or workdir} ({e.strerror or e}); "
                    f"{ckpt.intact_note()}") from e
  finally:
    # A failure already propagating is the one to report: closing after it may fail the same way.
    propagating = sys.exc_info()[0] is not None
    try:
      if writer is not None:
        writer.close()
    except OSError as e:
      if not propagating:
        raise UserError(f"cannot write {e.filename or workdir} ({e.strerror or e}); "
                        f"{ckpt.intact_note()}") from e
    finally:
      try:
        ckpt.close()
      except CheckpointError:
        if not propagating:
          raise


def _loop(config, workdir, model, ds, ckpt, writer, batches, train_step, eval_step, schedules, state,
          start_step, skipped_at_start, quantum, seq_len, eval_batch, batch_sharding, mesh, is_main,
          t_start) -> dict[str, Any]:
  """The step loop of `train` (see the module docstring), then the samples; returns the summary."""
  from deepseek_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  def save(at):
    bad = _nonfinite_leaf(state)
    if bad is not None:
      newest = ckpt.latest_step()
      raise TrainingDiverged(f"the train state of step {at} holds non-finite values ({bad}); not saved; "
                             + (f"the newest checkpoint is {ckpt.directory}/{newest}" if newest is not None
                                else "there is no checkpoint"))
    ckpt.save(at, state, {"data": batches.state(), "step": at})

  steps = int(config.steps)
  summary: dict[str, Any] = {"first_loss": None, "last_loss": None, "first_ce": None, "last_ce": None,
                             "eval_loss": None, "eval_bpb": None}
  progress = None
  log_lines = False
  if is_main and config.progress:
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      progress = tqdm(total=steps, initial=start_step, dynamic_ncols=True, mininterval=1.0)
    else:  # no terminal: a line per log step, not carriage returns
      log_lines = True
  say = progress.write if progress is not None else (lambda text: print(text, flush=True))
  step = start_step
  stopped = "done"
  interval_tokens, interval_t0, measured_tokens, measured_time = 0, None, 0, 0.0
  pending = None  # (step, bad_streak) of the newest step, read by the guard one step later
  window = profile_lib.TraceWindow(os.path.join(workdir, "profile"), int(config.profile.start_step),
                                   int(config.profile.steps))

  def guard(entry):
    """Stops the run once max_bad_steps consecutive steps were skipped (saving the state first)."""
    at, streak = entry[0], int(entry[1])
    if streak and config.max_bad_steps and streak >= config.max_bad_steps:
      save(step)
      ckpt.wait()
      raise TrainingDiverged(f"{streak} consecutive steps had a non-finite loss or gradient "
                             f"(step {at}); checkpoint saved in {ckpt.directory}/{step}")

  try:
    with _signal_guard() as stop, sharding_lib.use_mesh(mesh):
      while step < steps:
        bs = schedules.global_batch(step, quantum)
        local = batches.next_batch(bs)
        window.before(step, state)
        batch = _global_batch(local, batch_sharding, bs)
        state, metrics = train_step(state, batch)
        step += 1
        profiled = window.after(step, train_step, (state, batch), main=is_main)
        if profiled is not None:
          summary["profile"] = window.out_dir
          say(profile_lib.summarize(profiled))
          if interval_t0 is not None:   # the profiled steps and their folding are not training throughput
            interval_t0, interval_tokens = time.time(), 0
        # The guard reads the previous step's streak (cumulative, so no step goes unseen) while this one
        # is already queued: the host never waits on the step it just dispatched.
        previous, pending = pending, (step, metrics["bad_streak"])
        if previous is not None:
          guard(previous)
        if interval_t0 is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics["bad_streak"])
          interval_t0, interval_tokens = time.time(), 0
        else:
          interval_tokens += bs * seq_len
        if config.log_every and (step % config.log_every == 0 or step in (1, steps)):
          rec = _scalars(metrics)
          rec.pop("finite", None)
          now = time.time()
          if interval_tokens:
            rec["tokens_per_sec"] = interval_tokens / max(now - interval_t0, 1e-9)
            measured_tokens += interval_tokens
            measured_time += now - interval_t0
          interval_t0, interval_tokens = now, 0
          rec["batch_size"] = bs
          writer.write(step, rec)
          if summary["first_loss"] is None:
            summary["first_loss"], summary["first_ce"] = rec["loss"], rec["ce"]
          summary["last_loss"], summary["last_ce"] = rec["loss"], rec["ce"]
          if progress is not None:
            progress.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec.get('tokens_per_sec', 0):.0f}")
          elif log_lines:
            speed = f", {rec['tokens_per_sec']:.0f} tokens/s" if "tokens_per_sec" in rec else ""
            say(f"step {step}/{steps}: cross-entropy {rec['ce']:.4f}, objective {rec['loss']:.4f}, grad norm "
                f"{rec['grad_norm']:.3g}, lr {rec['lr']:.3g}{speed}")
        if config.eval_every and (step % config.eval_every == 0 or step == steps):
          t0 = time.time()
          loss = evaluate(eval_step, state, ds.held_out, seq_len, eval_batch, int(config.eval_batches),
                          batch_sharding)
          bpb = data_lib.bits_per_byte(loss, ds.heldout_bytes_per_token)
          writer.write(step, {"eval_loss": loss, "eval_bpb": bpb})
          summary["eval_loss"], summary["eval_bpb"] = loss, bpb
          if log_lines:
            say(f"step {step}/{steps}: held-out cross-entropy {loss:.4f}, {bpb:.4f} bits/byte")
          if interval_t0 is not None:
            interval_t0 += time.time() - t0  # evaluation time is not training throughput
        if progress is not None:
          progress.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          save(step)
        else:
          ckpt.poll()
        if stop.is_set():
          stopped = "signal"
          break
      if pending is not None:
        guard(pending)
      ran = step - start_step
      if ran and _host_int(state.skipped) - skipped_at_start >= ran:
        # Nothing was learned: no checkpoint (it would only move the data position past these batches).
        raise TrainingDiverged(f"all {ran} steps since step {start_step} had a non-finite loss or gradient; "
                               "lower optimizer.lr or check the data")
      save(step)
      ckpt.wait()
  finally:
    window.close()
    if progress is not None:
      progress.close()
  samples = []
  if stopped == "done" and int(config.sample.num) > 0:
    # SPMD like the steps: every process samples from the sharded state (the same tokens), process 0 writes.
    # Only the mesh, not the activation rules: one row cannot be split over the batch axes.
    with jax.set_mesh(mesh):
      for i in range(int(config.sample.num)):
        samples.append(sample_text(model, state.variables, ds.tokenizer, config.sample.prompt,
                                   int(config.sample.length), temperature=float(config.sample.temperature),
                                   seed=int(config.seed) + i))
    if is_main:
      with open(os.path.join(workdir, "samples.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(samples) + "\n")
  summary.update(step=step, stopped=stopped, samples=samples, wall_s=time.time() - t_start,
                 tokens_per_sec=(measured_tokens / measured_time) if measured_time else None)
  return summary
