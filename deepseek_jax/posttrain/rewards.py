"""Rule-based rewards: plain Python functions `fn(completion: str, answer: str) -> float`.

Built in (R1 section 2.2.2): 'answer' (accuracy: 1 when the text inside the last <answer>...</answer> equals
the reference answer, whitespace stripped, else 0) and 'format' (1 when the completion is exactly
<think>...</think><answer>...</answer>, else 0).  Any other function is named 'package.module:function'.
`score` applies weighted functions to a batch and turns a function that raises into a `RewardError`
naming it and the completion.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

import numpy as np

RewardFn = Callable[[str, str], float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


class RewardError(ValueError):
  """A reward function raised or returned a non-finite value."""


def extract_answer(completion: str) -> str | None:
  """The text of the last <answer>...</answer> block (stripped), or None."""
  found = _ANSWER.findall(completion)
  return found[-1].strip() if found else None


def answer_reward(completion: str, answer: str) -> float:
  """1.0 when the completion's answer equals `answer` (stripped), else 0.0."""
  got = extract_answer(completion)
  return float(got is not None and got == str(answer).strip())


def format_reward(completion: str, answer: str) -> float:  # pylint: disable=unused-argument
  """1.0 when the completion is <think>...</think><answer>...</answer> and nothing else, else 0.0."""
  return float(_FORMAT.match(completion) is not None)


BUILTIN: dict[str, RewardFn] = {"answer": answer_reward, "format": format_reward}


def resolve(name: str) -> RewardFn:
  """A reward function by built-in name or 'package.module:function'.

  Raises:
    RewardError: unknown name, unimportable module or missing function.
  """
  if name in BUILTIN:
    return BUILTIN[name]
  if ":" not in name:
    raise RewardError(f"reward {name!r}: not one of {sorted(BUILTIN)} nor 'package.module:function'")
  module, attr = name.split(":", 1)
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise RewardError(f"reward {name!r}: cannot import ({type(e).__name__}: {e})") from e
  if not callable(fn):
    raise RewardError(f"reward {name!r} is not callable")
  return fn


def score(fns: Sequence[tuple[str, RewardFn, float]], completions: Sequence[str],
          answers: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Weighted total rewards of a batch and each function's rewards.

  Args:
    fns: (name, function, weight) triples.
    completions: the decoded completions.
    answers: the reference answer of each completion's problem.
  Returns:
    (total [N] float32 = sum of weight x reward, {name: [N] float32}).
  Raises:
    RewardError: a function raised or returned something that is not a finite number.
  """
  parts = {}
  total = np.zeros((len(completions),), np.float32)
  for name, fn, weight in fns:
    values = np.zeros((len(completions),), np.float32)
    for i, (c, a) in enumerate(zip(completions, answers)):
      try:
        v = float(fn(c, a))
      except Exception as e:  # pylint: disable=broad-except  # any user code
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} on completion {c[:60]!r}") from e
      if not np.isfinite(v):
        raise RewardError(f"reward {name!r} returned {v} on completion {c[:60]!r}")
      values[i] = v
    parts[name] = values
    total += weight * values
  return total, parts
