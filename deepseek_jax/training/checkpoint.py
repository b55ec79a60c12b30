"""Orbax checkpoints of a run: the train state (params, router state, optimizer state, step, rng) plus a JSON
record (data iterator position, step), saved asynchronously, restored onto any sharding.

Integrity: once orbax has finished a step, the SHA-256 of every file it wrote goes into the step's
`checksums.json`; a restore checks them first (a checkpoint without one, from an interrupted run, is
restored with a warning); `verify_step` is that check alone, reading only (for loaders of a run's steps).
`Checkpointer.restore_latest` walks the saved steps newest first: a damaged or unreadable checkpoint is named
on one line and the previous one is tried; when none can be read it raises `CheckpointError` and leaves them
all in place (it never answers "start afresh" for a run that has checkpoints).

Write failures (a full disk, a quota) raise `CheckpointError` once, naming the step and the cause, and saying
which earlier checkpoint is intact; orbax's own tracebacks of that failure are not printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from deepseek_jax.training.errors import CheckpointError

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 22


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != CHECKSUMS_FILE:
        out.append(rel)
  return sorted(out)


def verify_step(step_dir: str | os.PathLike) -> bool:
  """Checks the files of a saved step (its directory) against its checksums.json; reads only.

  Returns:
    True when verified, False when the step has no checksums.json (it was not sealed).
  Raises:
    CheckpointError: a file is missing or its digest differs (named), or checksums.json is unreadable.
  """
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
    if not isinstance(files, dict):
      raise ValueError("'files' is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e})") from e
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if os.path.relpath(os.path.realpath(full), os.path.realpath(step_dir)).startswith(os.pardir):
      raise CheckpointError(f"{path} names a file outside the checkpoint: {rel}")
    if not os.path.isfile(full):
      raise CheckpointError(f"{full} is missing")
    if _file_digest(full) != want:
      raise CheckpointError(f"{full} does not match its checksum")
  return True


def _cause(e: BaseException) -> str:
  """The shortest honest description of an orbax / tensorstore / OS error."""
  text = str(e)
  m = re.search(r"os_error_code='(\d+)'", text)
  if m:
    return os.strerror(int(m.group(1)))
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  for cut in ("[tensorstore_spec", "See full TensorStore details"):
    text = text.split(cut, 1)[0]
  text = text.strip().splitlines()
  return f"{type(e).__name__}: {(text[0] if text else '')[:200]}"


class _QuietOrbaxFailures(logging.Filter):
  """Drops orbax's and asyncio's error records (with tracebacks) of a failed background write: the
  Checkpointer reports that failure itself, once."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio":
      return False
    return f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


def _is_closed_loop_error(exc: BaseException) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


@contextlib.contextmanager
def _quiet_failed_writes():
  """While a Checkpointer is open: no tracebacks from orbax's background threads. When one tensorstore
  write fails, orbax closes its event loop while the other writes are in flight; each of those then reports
  'Event loop is closed' through sys.unraisablehook / sys.excepthook (one traceback per array)."""
  filt = _QuietOrbaxFailures()
  loggers = [absl_logging.get_absl_logger(), logging.getLogger("asyncio")]
  for lg in loggers:
    lg.addFilter(filt)
  old_unraisable, old_except = sys.unraisablehook, sys.excepthook

  def unraisable(u):
    if not _is_closed_loop_error(u.exc_value):
      old_unraisable(u)

  def excepthook(typ, value, tb):
    if not _is_closed_loop_error(value):
      old_except(typ, value, tb)

  sys.unraisablehook, sys.excepthook = unraisable, excepthook
  try:
    yield
  finally:
    for lg in loggers:
      lg.removeFilter(filt)
    if sys.unraisablehook is unraisable:
      sys.unraisablehook = old_unraisable
    if sys.excepthook is excepthook:
      sys.excepthook = old_except


class Checkpointer:
  """Saves, seals (checksums) and restores (TrainState, meta dict) under `directory`.

  Args:
    directory: the checkpoint root (one subdirectory per step).
    max_to_keep: newest checkpoints kept (None: all).
    async_save: write in a background thread (the step loop continues).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.damaged: list[int] = []   # steps restore_latest could not use, newest first
    self._pending: Optional[int] = None
    self._failed = False
    self._quiet = _quiet_failed_writes()
    self._quiet.__enter__()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      self._quiet.__exit__(None, None, None)
      raise CheckpointError(f"cannot open the checkpoint directory {self.directory} ({_cause(e)})") from e

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Saved steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def intact_note(self, failed_step: Optional[int] = None) -> str:
    """'the previous checkpoint DIR/STEP is intact' (the newest before failed_step), for error messages."""
    older = [s for s in self.all_steps()
             if (failed_step is None or s < failed_step) and s not in self.damaged]
    if older:
      return f"the {'newest' if failed_step is None else 'previous'} checkpoint {self._path(older[-1])} is intact"
    return "no earlier checkpoint exists" if failed_step is not None else "there is no checkpoint yet"

  def _finish(self) -> None:
    """Waits for the pending save and seals it; a failure raises CheckpointError once."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      self._failed = True
      target = self._path(step) if step is not None else self.directory
      raise CheckpointError(f"writing checkpoint {target} failed ({_cause(e)}); "
                            f"{self.intact_note(step)}") from e
    if step is not None and jax.process_index() == 0:
      try:
        self.seal(step)
      except OSError as e:
        self._failed = True
        raise CheckpointError(f"writing the checksums of checkpoint {self._path(step)} failed ({_cause(e)}); "
                              f"{self.intact_note(step)}") from e

  def seal(self, step: int) -> None:
    """Writes the SHA-256 of every file of a finished step into its checksums.json (atomically)."""
    step_dir = self._path(step)
    digests = {rel: _file_digest(os.path.join(step_dir, rel)) for rel in _step_files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"algorithm": "sha256", "files": digests}, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS_FILE))

  def verify(self, step: int) -> bool:
    """`verify_step` of a saved step."""
    return verify_step(self._path(step))

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts saving (asynchronously) state and meta as `step`; a step already saved is left alone.

    The previous save is finished and sealed first. Before writing (single-process runs), the free space is
    compared with the size of the newest checkpoint.

    Args:
      step: the step number (the directory name).
      state: the TrainState (jax arrays, any sharding).
      meta: JSON-serializable dict (data iterator state etc.).
    Returns:
      Whether a save was started.
    Raises:
      CheckpointError: this or the previous save failed (the message says which checkpoint is intact).
    """
    self._finish()
    steps = self.all_steps()
    if step in steps:
      return False
    if steps and jax.process_count() == 1:  # processes deciding apart would leave orbax's barriers waiting
      need = sum(os.path.getsize(os.path.join(self._path(steps[-1]), rel))
                 for rel in _step_files(self._path(steps[-1])))
      free = shutil.disk_usage(self.directory).free
      if free < need:
        self._failed = True
        raise CheckpointError(f"not writing checkpoint {self._path(step)}: {free / 2**20:.2f} MiB free on its "
                              f"filesystem, the last checkpoint took {need / 2**20:.2f} MiB; "
                              f"{self.intact_note(step)}")
    self._pending = step
    try:
      return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                              meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      self._failed = True
      raise CheckpointError(f"writing checkpoint {self._path(step)} failed ({_cause(e)}); "
                            f"{self.intact_note(step)}") from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Reads one checkpoint, after checking its checksums.

    Args:
      step: the saved step.
      abstract_state: TrainState of jax.ShapeDtypeStruct (with .sharding) giving structure and layout.
    Returns:
      (state, meta).
    Raises:
      CheckpointError: a checksum does not match.
    """
    if not self.verify(step):
      absl_logging.warning("checkpoint %s has no %s (its save was interrupted before sealing); restoring it "
                           "unverified", self._path(step), CHECKSUMS_FILE)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_latest(self, abstract_state: Any,
                     check: Optional[Callable[[Any], Optional[str]]] = None) -> Optional[tuple[int, Any, dict]]:
    """The newest readable checkpoint; the ones skipped are listed in `self.damaged`.

    Args:
      abstract_state: as in `restore`.
      check: optional test of a restored state returning a reason to reject it (e.g. non-finite values).
    Returns:
      (step, state, meta), or None when there are no checkpoints.
    Raises:
      CheckpointError: there are checkpoints but none can be read (nothing is changed on disk).
    """
    steps = self.all_steps()
    self.damaged = []
    reasons = []
    for i in range(len(steps) - 1, -1, -1):
      step = steps[i]
      try:
        state, meta = self.restore(step, abstract_state)
        reason = check(state) if check is not None else None
        if reason is None:
          return step, state, meta
      except CheckpointError as e:
        reason = str(e)
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        reason = _cause(e)
      self.damaged.append(step)
      reasons.append(reason)
      nxt = f"falling back to step {steps[i - 1]}" if i > 0 else "no older checkpoint"
      absl_logging.warning("checkpoint %s is damaged or unreadable (%s); %s", self._path(step), reason, nxt)
    if steps:
      raise CheckpointError(f"no checkpoint in {self.directory} can be read (steps {steps}; newest: "
                            f"{reasons[0]}); nothing was changed: restore them, or move them away to start the "
                            "run afresh")
    return None

  def set_aside(self, step: int) -> str:
    """Renames a damaged step's directory to '<step>.damaged' (numbered if taken) so that the step can be
    written again; nothing is deleted. Returns the new path."""
    src = self._path(step)
    dst, n = src + ".damaged", 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.damaged-{n}"
    os.rename(src, dst)
    self._manager.reload()
    return dst

  def poll(self) -> None:
    """Seals the pending save if orbax has finished it (cheap; the step loop calls it every step)."""
    # Processes would see their saves finish at different steps: multi-process runs seal at the next save.
    if jax.process_count() == 1 and self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish()

  def reload(self) -> None:
    """Re-reads the list of steps from disk (after another process changed it)."""
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending saves are on disk and sealed."""
    self._finish()

  def close(self) -> None:
    """Finishes pending saves and releases the manager; after a reported failure it only releases."""
    try:
      if not self._failed:
        self._finish()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
      finally:
        self._quiet.__exit__(None, None, None)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
