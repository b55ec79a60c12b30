"""JSON Lines records: one object per non-blank line, each checked by the caller's predicate."""

from __future__ import annotations

import json
import os
from typing import Callable


def read_records(path: str, *, valid: Callable[[object], bool], expected: str, what: str) -> list:
  """The records of a JSONL file, every one of which passes `valid`.

  Args:
    path: the file.
    valid: a predicate on each parsed line.
    expected: what a valid line holds, for the message naming a line that fails `valid`.
    what: the plural noun of the records, for the message of a file without any.
  Raises:
    ValueError: a missing file, a line that is not JSON or fails `valid` (named by its number), no records.
  """
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not JSON ({e})") from e
      if not valid(rec):
        raise ValueError(f"{path}:{i}: expected {expected}")
      out.append(rec)
  if not out:
    raise ValueError(f"{path}: no {what}")
  return out
