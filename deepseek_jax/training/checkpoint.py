"""Orbax checkpoints of a run: the train state (params, router state, optimizer state, step, rng) plus a JSON
record (data iterator position, step), saved asynchronously, restored onto any sharding.

`Checkpointer.restore_latest` walks the saved steps newest first: a checkpoint that cannot be read is
reported with a warning naming it and the previous one is tried.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (TrainState, meta dict) under `directory`.

  Args:
    directory: the checkpoint root (one subdirectory per step).
    max_to_keep: newest checkpoints kept (None: all).
    async_save: write in a background thread (the step loop continues).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Saved steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts saving (asynchronously) state and meta as `step`; a step already saved is left alone.

    Args:
      step: the step number (the directory name).
      state: the TrainState (jax arrays, any sharding).
      meta: JSON-serializable dict (data iterator state etc.).
    Returns:
      Whether a save was started.
    """
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Reads one checkpoint.

    Args:
      step: the saved step.
      abstract_state: TrainState of jax.ShapeDtypeStruct (with .sharding) giving structure and layout.
    Returns:
      (state, meta).
    """
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """The newest readable checkpoint.

    Args:
      abstract_state: as in `restore`.
    Returns:
      (step, state, meta), or None when no checkpoint can be read.
    """
    steps = self.all_steps()
    for i in range(len(steps) - 1, -1, -1):
      step = steps[i]
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        path = os.path.join(self.directory, str(step))
        nxt = (f"falling back to step {steps[i - 1]}" if i > 0 else "no older checkpoint; starting fresh")
        warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); {nxt}")
    return None

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
