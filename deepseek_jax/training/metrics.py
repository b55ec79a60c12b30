"""Run metrics: one JSON object per logged step in `metrics.jsonl`, TensorBoard scalars, from process 0 only.

A resumed run appends to the same file; `read_metrics` keeps, for each step, the record written last, so a
step repeated after a restart (logged before a crash, then again) appears once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
  """Scalars and small arrays as JSON-friendly Python values (non-finite floats as None)."""
  arr = np.asarray(value)
  if arr.ndim == 0:
    v = arr.item()
    if isinstance(v, float) and not math.isfinite(v):
      return None
    return v
  return [to_python(x) for x in arr]


class MetricsWriter:
  """Appends step records to workdir/metrics.jsonl and TensorBoard event files in workdir/tensorboard.

  Args:
    workdir: the run directory.
    enabled: False on every process but 0 (nothing is written).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
    self._file = None
    self._tb = None
    if enabled:
      os.makedirs(os.fspath(workdir), exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

  def write(self, step: int, record: dict) -> Optional[dict]:
    """Writes one record (scalars; lists of per-layer values go to TensorBoard one tag per entry).

    Args:
      step: the step (stored as 'step').
      record: metric name -> scalar / array.
    Returns:
      The JSON record written (None when disabled).
    """
    if not self.enabled:
      return None
    out = {"step": int(step)}
    out.update({k: to_python(v) for k, v in record.items()})
    self._file.write(json.dumps(out) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in out.items():
        if k == "step":
          continue
        if isinstance(v, list):
          for i, x in enumerate(v):
            if isinstance(x, (int, float)):
              self._tb.add_scalar(f"{k}/{i}", x, step)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return out

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The records of workdir/metrics.jsonl, one per step (the last written wins), ordered by step.

  Args:
    workdir: the run directory.
  Returns:
    list of dicts.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  by_step: dict[tuple, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      rec = json.loads(line)
      kind = "eval" if "eval_loss" in rec else "train"
      by_step[(rec["step"], kind)] = rec
  return [by_step[k] for k in sorted(by_step)]
