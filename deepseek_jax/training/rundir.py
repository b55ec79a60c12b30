"""A run directory holds one run: a lock held by the trainer using it, and the run's resolved experiment
config (`experiment_config.json`), against which a restart is checked.

Identity: every field of the resolved experiment config, except those in `RESUMABLE_FIELDS`, must be the
same when a run directory is trained again. The resumable ones are bookkeeping (steps, logging, checkpoint
and evaluation cadence, sampling, profiling, the data cache), the layout over devices (mesh, zero1, grad_accum),
the model's implementation choices that never change the math (attention/moe/matmul implementation, remat
policy), and the learning-rate schedule's values (lr and its phase fractions, MTP weights, balance speed,
batch ramp), which a run may lower or stretch when resumed. Everything else (the model, the data and
tokenizer, seed, batch_size, seq_len, precision, AdamW's constants) defines the run.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import fnmatch
import json
import os
from typing import Any, Optional

from deepseek_jax.training.errors import UserError

CONFIG_FILE = "experiment_config.json"
LOCK_FILE = "train.lock"

RESUMABLE_FIELDS = (
    "steps", "log_every", "checkpoint_every", "eval_every", "eval_batches", "max_to_keep", "max_bad_steps",
    "progress", "grad_accum", "mesh.*", "zero1", "profile.*", "sample.*", "data.cache_dir", "model.preset",
    "model.attention_impl", "model.moe_impl", "model.matmul_impl", "model.remat_policy",
    "optimizer.lr", "optimizer.warmup_fraction", "optimizer.constant_until", "optimizer.cosine_until",
    "optimizer.tail_until", "optimizer.min_lr_ratio", "optimizer.final_lr_ratio", "mtp.*", "balance.*",
    "batch_ramp.*",
)


def resolved_config(config, model_cfg) -> dict[str, Any]:
  """The experiment config as JSON-ready dict, `model` holding every field of the resolved ModelConfig.

  Args:
    config: the experiment ConfigDict.
    model_cfg: its ModelConfig (`training.config.model_config`).
  Returns:
    A nested dict of JSON values.
  """
  out = json.loads(config.to_json_best_effort())
  out["model"] = {"preset": config.model.preset, **json.loads(json.dumps(dataclasses.asdict(model_cfg)))}
  return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _resumable(name: str) -> bool:
  return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in RESUMABLE_FIELDS)


def config_differences(saved: dict, current: dict) -> list[str]:
  """Fields (dotted names) defining the run whose values differ, as 'name: saved -> current'."""
  a, b = _flatten(saved), _flatten(current)
  diffs = []
  for name in sorted(set(a) | set(b)):
    if _resumable(name):
      continue
    missing = object()
    va, vb = a.get(name, missing), b.get(name, missing)
    if va != vb:
      show = lambda v: "(absent)" if v is missing else json.dumps(v)
      diffs.append(f"{name}: {show(va)} -> {show(vb)}")
  return diffs


def check_same_run(workdir: str, current: dict) -> None:
  """Refuses to train `workdir` with a config that defines a different run than the one it holds.

  Args:
    workdir: the run directory.
    current: `resolved_config` of the config about to run.
  Raises:
    UserError: the saved config is unreadable, or fields defining the run differ (all of them named).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); restore it or use another --workdir") from e
  diffs = config_differences(saved, current)
  if diffs:
    raise UserError(f"{workdir} holds a different run ({'; '.join(diffs)}); use another --workdir, or the "
                    "run's own values (only bookkeeping, mesh and schedule values may change on resume, see "
                    "deepseek_jax.training.rundir)")


def save_config(workdir: str, current: dict) -> None:
  """Writes `current` as workdir/experiment_config.json (atomically)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(current, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class RunLock:
  """An exclusive lock on a run directory (flock on workdir/train.lock; the OS releases it when the holder
  exits, even when killed). The lock file stays and is never written.

  Args:
    workdir: the run directory (created if missing).
  Raises:
    UserError: another process holds the lock, or workdir is not a directory.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise UserError(f"--workdir={workdir} is not a directory")
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"--workdir={workdir}: cannot create {self.path} ({e.strerror})") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        raise UserError(f"--workdir={workdir} is in use by another trainer (it holds {self.path}); wait for "
                        "it to end or use another --workdir") from e
      raise UserError(f"--workdir={workdir}: cannot lock {self.path} ({e.strerror})") from e
    self._fd = fd

  def release(self) -> None:
    """Releases the lock (idempotent)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
