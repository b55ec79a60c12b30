"""The post-training loops behind `python -m experiments.sft` and `python -m experiments.grpo`.

`run_sft(config, workdir)`: examples (a JSONL file, or the task's worked solutions) -> one example per row
-> masked cross-entropy steps -> checkpoints (the TrainState, as `experiments.train` writes them) ->
greedy accuracy on held-out task problems at the end.

`run_grpo(config, workdir)`:
  1. the initial policy: `init_from` (a run workdir: its newest checkpoint; an HF checkpoint; or a converted
     orbax checkpoint), else a fresh model SFT'd on the task by `run_sft` in workdir/sft (resumable itself);
     the reference policy is a frozen copy of it;
  2. restores workdir/checkpoints ({'policy': TrainState, 'ref': variables}) when present;
  3. per step: prompts drawn by (seed, step) -> `rollout.sample_groups` (G completions each, routing
     recorded for replay) -> group advantages -> old and reference log-probs (replayed) -> epochs x
     minibatches updates (`policy.make_grpo_step`) -> a metrics.jsonl row; held-out greedy accuracy before
     the first step and every eval_every steps; a checkpoint every checkpoint_every steps and at the end.
The same workdir resumes exactly: prompts, sampling keys and updates depend only on (seed, step) and the
checkpointed state.  Sharding as in training: the state laid out by the logical-axis rules over the mesh
(data / fsdp / expert / tensor), rollout rows split over the data axes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import sharding as sharding_lib
from deepseek_jax.data.tokenizer import ByteTokenizer, check_vocab, load_tokenizer
from deepseek_jax.model import DeepSeekV3, to_layer_layout
from deepseek_jax.posttrain import replay as replay_lib
from deepseek_jax.posttrain import rewards as rewards_lib
from deepseek_jax.posttrain import sft as sft_lib
from deepseek_jax.posttrain.grpo import GRPOLoss, group_advantages
from deepseek_jax.posttrain.policy import make_grpo_step, make_score_fn
from deepseek_jax.posttrain.rollout import evaluate_accuracy, sample_groups
from deepseek_jax.posttrain.tasks import ChainSum, load_problems
from deepseek_jax.training.checkpoint import Checkpointer
from deepseek_jax.training.config import model_config
from deepseek_jax.training.errors import UserError
from deepseek_jax.training.metrics import MetricsWriter
from deepseek_jax.training.optimizer import make_optimizer
from deepseek_jax.training.state import init_state
from deepseek_jax.training.trainer import data_parallel_size, make_mesh


# ------------------------------------------------------------------------------------------ shared pieces
def _positive(config, *names):
  for name in names:
    node = config
    for part in name.split(".")[:-1]:
      node = node[part]
    v = node[name.split(".")[-1]]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise UserError(f"config.{name}={v!r} must be a positive integer")


@contextlib.contextmanager
def _stop_on_signal():
  """Yields an event set by SIGTERM / SIGINT (main thread only), so the loop checkpoints and stops."""
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  for s in old:
    signal.signal(s, lambda *_: stop.set())
  try:
    yield stop
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _task(config) -> ChainSum:
  t = config.task
  try:
    return ChainSum(int(t.terms), int(t.max_value), float(t.eval_fraction))
  except ValueError as e:
    raise UserError(f"config.task: {e}") from e


def _tokenizer(init_from: str, cfg):
  """The tokenizer of init_from (a run's tokenizer/, or one saved beside a checkpoint), else the byte one."""
  from deepseek_jax.inference.loading import saved_tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(init_from, "tokenizer") if init_from else ""
  tok = None
  try:
    if path and os.path.isdir(path):
      tok = load_tokenizer(path)
    elif init_from and os.path.isdir(init_from):
      tok = saved_tokenizer(init_from)
  except (OSError, ValueError) as e:
    raise UserError(f"config.init_from={init_from}: cannot read its tokenizer ({e})") from e
  tok = tok or ByteTokenizer()
  try:
    check_vocab(tok, cfg.vocab_size)
  except ValueError as e:
    raise UserError(f"tokenizer: {e}") from e
  return tok


def _tx_factory(config):
  o = config.optimizer

  def factory(params):
    return make_optimizer(params, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                          clip_norm=o.clip_norm)

  return factory


def _initial_variables(config, model, mesh=None):
  """Variables {'params', 'router'} of `config.init_from`, or None (a fresh model).

  init_from is a training run's workdir (its newest checkpoint, read with the run's own config.json), an HF
  checkpoint directory (config.json + safetensors, `interop.hf.load`) or a converted orbax checkpoint
  (`interop.load_orbax`).  The source's MTP modules are dropped when the policy has none (post-training
  trains the main model); everything else must match the policy's config in structure and shape.  HF and
  orbax checkpoints are read straight onto `mesh` (each device reads its shards); a run's checkpoint onto the
  default device.
  """
  from deepseek_jax import interop  # pylint: disable=g-import-not-at-top
  from deepseek_jax.inference.loading import check_like, load_workdir  # pylint: disable=g-import-not-at-top
  path = config.init_from
  if not path:
    return None
  where = f"config.init_from={path}"
  if not os.path.isdir(path):
    raise UserError(f"{where}: no such directory")
  try:
    if os.path.isdir(os.path.join(path, "checkpoints")):
      _, variables, _ = load_workdir(path)
    elif any(f.endswith(".safetensors") for f in os.listdir(path)):
      _, variables = interop.hf.load(path, mesh=mesh)
    else:
      _, variables = interop.load_orbax(path, mesh=mesh)
  except Exception as e:  # pylint: disable=broad-except  # orbax / safetensors / json raise many types
    raise UserError(f"{where}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32)), jax.random.PRNGKey(0))
  abstract = {"params": abstract["params"], "router": abstract.get("router", {})}
  variables = {c: {k: v for k, v in (variables.get(c) or {}).items()
                   if k in abstract[c] or not k.startswith("mtp")} for c in ("params", "router")}
  variables = to_layer_layout(model.cfg, variables, donate=True)
  try:
    return check_like(where, abstract, variables)
  except ValueError as e:
    raise UserError(str(e)) from e


def _write_run_files(workdir: str, tokenizer, cfg) -> None:
  os.makedirs(workdir, exist_ok=True)
  tokenizer.save(os.path.join(workdir, "tokenizer"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f, indent=2)


def _progress(config, total: int, initial: int):
  if not config.progress:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=1.0)


def _rows_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES, *([None] * (ndim - 1))))


def _put_rows(tree, mesh):
  """Host arrays with a leading row axis, split over the data-parallel axes."""
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), _rows_sharding(mesh, np.ndim(x))), tree)


# ------------------------------------------------------------------------------------------ SFT
def run_sft(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) supervised fine-tuning (see module docstring).

  Returns:
    {'step', 'first_loss', 'last_loss', 'eval_accuracy' (task problems; None with a data file), 'wall_s'}.
  Raises:
    UserError: a problem with the config, the data or the devices.
  """
  t0 = time.time()
  _positive(config, "sft.steps", "sft.batch_size", "sft.seq_len", "eval_problems", "eval_batch")
  cfg = model_config(config)
  mesh = make_mesh(config.mesh)
  s = config.sft
  if s.batch_size % data_parallel_size(mesh):
    raise UserError(f"config.sft.batch_size={s.batch_size} must be a multiple of data x fsdp x expert = "
                    f"{data_parallel_size(mesh)}")
  if s.seq_len > cfg.max_position_embeddings:
    raise UserError(f"config.sft.seq_len={s.seq_len} exceeds model.max_position_embeddings="
                    f"{cfg.max_position_embeddings}")
  model = DeepSeekV3(cfg)
  tokenizer = _tokenizer(config.init_from, cfg)
  task = _task(config)
  try:
    if s.data:
      examples = sft_lib.load_examples(s.data)
    else:
      examples = task.demonstrations(np.random.default_rng([int(config.seed), 1]), int(s.examples),
                                     float(config.task.teacher_error))
    rows = sft_lib.example_rows(tokenizer, examples, int(s.seq_len))
  except ValueError as e:
    raise UserError(f"config.sft.data{'=' + s.data if s.data else ' (task examples)'}: {e}") from e
  _write_run_files(workdir, tokenizer, cfg)
  tx_factory = _tx_factory(config)
  state_sharding_fn = sharding_lib.train_state_sharding(model, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.max_to_keep) or None)
  rng = jax.random.PRNGKey(int(config.seed))
  with sharding_lib.use_mesh(mesh):
    abstract, tx, shardings = init_state(model, tx_factory, rng, int(s.seq_len), state_sharding_fn,
                                         abstract_only=True)
    restored = ckpt.restore_latest(abstract)
  if restored is not None:
    start, state, _ = restored
  else:
    variables = _initial_variables(config, model, mesh)
    with sharding_lib.use_mesh(mesh):
      state, tx, shardings = init_state(model, tx_factory, rng, int(s.seq_len), state_sharding_fn,
                                        variables=variables)
    start = 0
  step_fn = _sft_step(config, model, tx, shardings)
  writer = MetricsWriter(workdir)
  progress = _progress(config, int(s.steps), start)
  summary: dict[str, Any] = {"first_loss": None, "last_loss": None, "eval_accuracy": None}
  step = start
  try:
    with _stop_on_signal() as stop, sharding_lib.use_mesh(mesh):
      while step < s.steps:
        idx = sft_lib.batch_indices(rows["inputs"].shape[0], int(s.batch_size), step, int(config.seed))
        batch = _put_rows({k: v[idx] for k, v in rows.items()}, mesh)
        state, metrics = step_fn(state, batch)
        step += 1
        if config.log_every and (step % config.log_every == 0 or step == s.steps):
          rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
          writer.write(step, rec)
          summary["first_loss"] = rec["loss"] if summary["first_loss"] is None else summary["first_loss"]
          summary["last_loss"] = rec["loss"]
          if progress is not None:
            progress.set_postfix(loss=f"{rec['loss']:.3f}")
        if progress is not None:
          progress.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          ckpt.save(step, state, {"step": step})
        if stop.is_set():
          break
      ckpt.save(step, state, {"step": step})
      ckpt.wait()
    if not s.data and step >= s.steps:
      eval_problems = task.sample(np.random.default_rng([int(config.seed), 2]), int(config.eval_problems),
                                  "eval", distinct=True)
      with jax.set_mesh(mesh):
        summary["eval_accuracy"] = evaluate_accuracy(
            model, state.variables, tokenizer, eval_problems, prompt_len=int(config.grpo.prompt_len),
            max_new_tokens=int(config.grpo.max_new_tokens), batch_size=int(config.eval_batch))
      writer.write(step, {"eval_accuracy": summary["eval_accuracy"]})
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()
  summary.update(step=step, wall_s=time.time() - t0)
  return summary


def _sft_step(config, model, tx, shardings):
  """The SFT step of a config (learning rate, balance settings, state layout)."""
  return sft_lib.make_sft_step(model, tx, lr=float(config.sft.lr), alpha=float(config.balance.alpha),
                               gamma=float(config.balance.gamma), state_sharding=shardings)


# ------------------------------------------------------------------------------------------ GRPO
def _reward_fns(config):
  names = [n.strip() for n in str(config.rewards.names).split(",") if n.strip()]
  try:
    weights = [float(w) for w in str(config.rewards.weights).split(",") if w.strip()]
  except ValueError as e:
    raise UserError(f"config.rewards.weights={config.rewards.weights!r}: {e}") from e
  if not names:
    raise UserError("config.rewards.names is empty: GRPO needs at least one reward function")
  if len(weights) != len(names):
    raise UserError(f"config.rewards.weights has {len(weights)} entries for {len(names)} reward names")
  try:
    return [(n, rewards_lib.resolve(n), w) for n, w in zip(names, weights)]
  except rewards_lib.RewardError as e:
    raise UserError(f"config.rewards: {e}") from e


def _check_grpo(config, cfg, mesh) -> GRPOLoss:
  g = config.grpo
  _positive(config, "grpo.steps", "grpo.prompts_per_step", "grpo.max_new_tokens", "grpo.prompt_len",
            "grpo.epochs", "grpo.minibatches", "eval_problems", "eval_batch")
  if not isinstance(g.group_size, int) or g.group_size < 2:
    raise UserError(f"config.grpo.group_size={g.group_size!r}: group-normalized advantages need G >= 2")
  if not g.temperature > 0:
    raise UserError(f"config.grpo.temperature={g.temperature!r} must be > 0 (GRPO samples)")
  if g.replay not in ("auto", "on", "off"):
    raise UserError(f"config.grpo.replay={g.replay!r}: expected 'auto', 'on' or 'off'")
  if g.prompt_len + g.max_new_tokens > cfg.max_position_embeddings:
    raise UserError(f"config.grpo.prompt_len {g.prompt_len} + max_new_tokens {g.max_new_tokens} exceeds "
                    f"model.max_position_embeddings={cfg.max_position_embeddings}")
  rows = g.prompts_per_step * g.group_size
  dp = data_parallel_size(mesh)
  if rows % g.minibatches or (rows // g.minibatches) % dp:
    raise UserError(f"config.grpo: prompts_per_step x group_size = {rows} must split into minibatches="
                    f"{g.minibatches} of a multiple of data x fsdp x expert = {dp} rows")
  if config.eval_batch % dp:
    raise UserError(f"config.eval_batch={config.eval_batch} must be a multiple of data x fsdp x expert = {dp}")
  try:
    return GRPOLoss(str(g.normalization), float(g.clip_low), float(g.clip_high), float(g.kl_coef),
                    int(g.max_new_tokens))
  except ValueError as e:
    raise UserError(f"config.grpo: {e}") from e


def _problems(config, task):
  """(train problem source: fn(rng, n), held-out problems)."""
  if config.task.problems:
    try:
      pool = load_problems(config.task.problems)
    except ValueError as e:
      raise UserError(f"config.task.problems: {e}") from e
    n_eval = min(int(config.eval_problems), max(len(pool) // 5, 1))
    if len(pool) - n_eval < 1:
      raise UserError(f"config.task.problems={config.task.problems}: {len(pool)} problems leave none to train")
    train, held = pool[n_eval:], pool[:n_eval]
    return (lambda rng, n: [train[i] for i in rng.integers(0, len(train), size=n)]), held
  held = task.sample(np.random.default_rng([int(config.seed), 2]), int(config.eval_problems), "eval",
                     distinct=True)
  return (lambda rng, n: task.sample(rng, n, "train")), held


def _check_prompts(config, tokenizer, held_out) -> None:
  """Every prompt of a problems file (or the held-out set) fits config.grpo.prompt_len with its bos."""
  pool = load_problems(config.task.problems) if config.task.problems else held_out
  for i, p in enumerate(pool):
    n = len(tokenizer.encode(p.prompt)) + 1
    if n > config.grpo.prompt_len:
      raise UserError(f"problem {i} ({p.prompt[:40]!r}) has {n} tokens with bos, more than "
                      f"config.grpo.prompt_len={config.grpo.prompt_len}")


def run_grpo(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) GRPO (see module docstring).

  Returns:
    {'step', 'eval_accuracy_before', 'eval_accuracy', 'reward_first', 'reward_last', 'step_s' (mean
    seconds per GRPO step, compilation excluded), 'sft' (the SFT summary when one ran), 'wall_s'}.
  Raises:
    UserError: a problem with the config, the data, a reward function or the devices.
  """
  t_start = time.time()
  cfg = model_config(config)
  mesh = make_mesh(config.mesh)
  loss_cfg = _check_grpo(config, cfg, mesh)
  g = config.grpo
  reward_fns = _reward_fns(config)
  task = _task(config)
  draw, held_out = _problems(config, task)
  tokenizer = _tokenizer(config.init_from, cfg)
  _check_prompts(config, tokenizer, held_out)
  model = DeepSeekV3(cfg)
  moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
  replay = moe if g.replay == "auto" else g.replay == "on"
  summary: dict[str, Any] = {"sft": None}
  seq_len = int(g.prompt_len) + int(g.max_new_tokens)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.max_to_keep) or None)
  tx_factory = _tx_factory(config)
  rng = jax.random.PRNGKey(int(config.seed))
  state_sharding_fn = sharding_lib.train_state_sharding(model, mesh)

  with sharding_lib.use_mesh(mesh):
    abstract_policy, tx, shardings = init_state(model, tx_factory, rng, seq_len, state_sharding_fn,
                                                abstract_only=True)
    abstract = {"policy": abstract_policy,
                "ref": {"params": abstract_policy.params, "router": abstract_policy.router}}
    restored = ckpt.restore_latest(abstract)
  init_from = config.init_from
  if restored is not None:
    start, tree, _ = restored
    state, ref = tree["policy"], tree["ref"]
  else:
    if not init_from and config.sft.steps > 0:
      sft_dir = os.path.join(workdir, "sft")
      summary["sft"] = run_sft(config, sft_dir)
      init_from = sft_dir
    variables = _initial_variables(_with_init(config, init_from), model, mesh)
    with sharding_lib.use_mesh(mesh):
      state, tx, shardings = init_state(model, tx_factory, rng, seq_len, state_sharding_fn,
                                        variables=variables)
    ref = jax.tree.map(lambda x: x.copy(), state.variables)
    start = 0
  _write_run_files(workdir, tokenizer, cfg)

  step_fn = make_grpo_step(model, tx, loss_cfg, lr=float(g.lr), temperature=float(g.temperature),
                           alpha=float(config.balance.alpha), gamma=float(config.balance.gamma),
                           state_sharding=shardings, mesh=mesh)
  score = make_score_fn(model, temperature=float(g.temperature))
  writer = MetricsWriter(workdir)
  progress = _progress(config, int(g.steps), start)
  rows = int(g.prompts_per_step) * int(g.group_size)
  mb_rows = rows // int(g.minibatches)

  def accuracy(variables):
    with jax.set_mesh(mesh):
      return evaluate_accuracy(model, variables, tokenizer, held_out, prompt_len=int(g.prompt_len),
                               max_new_tokens=int(g.max_new_tokens), batch_size=int(config.eval_batch))

  summary.update(eval_accuracy_before=None, eval_accuracy=None, reward_first=None, reward_last=None)
  step, step_times = start, []
  try:
    if start == 0 and config.eval_every:
      summary["eval_accuracy_before"] = summary["eval_accuracy"] = accuracy(state.variables)
      writer.write(0, {"eval_accuracy": summary["eval_accuracy"]})
    with _stop_on_signal() as stop:
      while step < g.steps:
        t0 = time.time()
        problems = draw(np.random.default_rng([int(config.seed), 3, step]), int(g.prompts_per_step))
        key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 1), step)
        try:
          with jax.set_mesh(mesh):
            ro = sample_groups(model, state.variables, tokenizer, problems, reward_fns,
                               group_size=int(g.group_size), prompt_len=int(g.prompt_len),
                               max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                               rng=key, record_routing=moe)
        except rewards_lib.RewardError as e:
          raise UserError(str(e)) from e
        except ValueError as e:
          raise UserError(f"rollout: {e}") from e
        t_rollout = time.time() - t0
        adv = np.asarray(group_advantages(ro.rewards, int(g.group_size), scale=loss_cfg.scale_advantages,
                                          eps=loss_cfg.std_eps))
        batch = {"tokens": ro.tokens, "mask": ro.completion_mask, "fed": ro.fed, "advantages": adv}
        with sharding_lib.use_mesh(mesh):
          batch = _put_rows(batch, mesh)
          routing = None if ro.routing is None else _put_rows(ro.routing, mesh)
          replay_tree = (replay_lib.replay_collection(routing, seq_len - 1, weights=bool(g.replay_weights))
                         if replay and routing is not None else None)
          batch["old_logp"] = score(state.variables, batch["tokens"], replay_tree)
          batch["ref_logp"] = (score(ref, batch["tokens"], replay_tree) if loss_cfg.kl_coef
                               else jnp.zeros_like(batch["old_logp"]))
          if replay_tree is not None:
            batch["replay"] = replay_tree
          elif routing is not None:
            batch["sampled"] = replay_lib.replay_collection(routing, seq_len - 1)
          sums: dict[str, float] = {}
          n_updates = 0
          for _ in range(int(g.epochs)):
            for m in range(int(g.minibatches)):
              part = jax.tree.map(lambda x: x[m * mb_rows:(m + 1) * mb_rows], batch)
              state, metrics = step_fn(state, part)
              for k, v in jax.device_get(metrics).items():
                sums[k] = sums.get(k, 0.0) + float(v)
              n_updates += 1
        step += 1
        elapsed = time.time() - t0
        if step > start + 1:      # the first step of a process compiles
          step_times.append(elapsed)
        rec = {k: v / n_updates for k, v in sums.items()}
        rec.update(reward=float(ro.rewards.mean()), response_length=float(ro.lengths.mean()),
                   rollout_s=t_rollout, step_s=elapsed, updates=int(state.step))
        rec.update({f"reward_{k}": float(v.mean()) for k, v in ro.reward_parts.items()})
        summary["reward_first"] = rec["reward"] if summary["reward_first"] is None else summary["reward_first"]
        summary["reward_last"] = rec["reward"]
        if config.eval_every and (step % config.eval_every == 0 or step == g.steps):
          rec["eval_accuracy"] = summary["eval_accuracy"] = accuracy(state.variables)
        if config.log_every and (step % config.log_every == 0 or step == g.steps or "eval_accuracy" in rec):
          writer.write(step, rec)
        if progress is not None:
          progress.set_postfix(reward=f"{rec['reward']:.3f}", kl=f"{rec['kl']:.4f}",
                               acc=f"{summary['eval_accuracy'] or 0:.3f}")
          progress.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          ckpt.save(step, {"policy": state, "ref": ref}, {"step": step})
        if stop.is_set():
          break
    ckpt.save(step, {"policy": state, "ref": ref}, {"step": step})
    ckpt.wait()
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()
  summary.update(step=step, step_s=float(np.mean(step_times)) if step_times else None, replay=replay,
                 wall_s=time.time() - t_start)
  return summary


def _with_init(config, init_from: str):
  """config with init_from replaced (the SFT warm-up's workdir)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.init_from = init_from
  return c
