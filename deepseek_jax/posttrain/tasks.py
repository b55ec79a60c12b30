"""Verifiable tasks: problems with a prompt, a reference answer and a worked solution (SFT demonstrations).

`ChainSum` (shipped as code): add n numbers left to right, e.g. prompt '3+5+2=', answer '10', solution
'<think>3+5=8,8+2=10</think><answer>10</answer>' (R1's format, the partial sums as the reasoning).  Every
problem belongs to one split by a stable hash of its numbers, so held-out problems never appear in training.
`load_problems` reads other tasks from JSONL ({'prompt', 'answer'} per line).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from deepseek_jax.data import jsonl

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One verifiable problem.

  Attributes:
    prompt: the text the policy continues.
    answer: the reference answer the 'answer' reward compares with.
    solution: a correct completion in R1's format ('' when none is known).
  """
  prompt: str
  answer: str
  solution: str = ""


@dataclasses.dataclass(frozen=True)
class ChainSum:
  """Sums of `terms` integers in [0, max_value], added left to right.

  Attributes:
    terms: numbers per problem (>= 2).
    max_value: the largest number.
    eval_fraction: share of all problems held out (chosen by a stable hash of the numbers).
  """
  terms: int = 3
  max_value: int = 9
  eval_fraction: float = 0.2

  def __post_init__(self):
    if self.terms < 2:
      raise ValueError(f"terms={self.terms} must be >= 2")
    if self.max_value < 1:
      raise ValueError(f"max_value={self.max_value} must be >= 1")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")

  def split_of(self, numbers: Sequence[int]) -> str:
    """'eval' or 'train', a stable function of the numbers."""
    h = zlib.crc32(",".join(map(str, numbers)).encode()) / 2**32
    return "eval" if h < self.eval_fraction else "train"

  def problem(self, numbers: Sequence[int], slip: int = 0) -> Problem:
    """The problem of these numbers with its worked solution; `slip` is added to the last partial sum of
    the solution (a demonstration with an arithmetic error; the reference answer stays correct)."""
    steps, acc = [], int(numbers[0])
    for i, x in enumerate(numbers[1:], start=2):
      total = acc + int(x)
      steps.append(f"{acc}+{int(x)}={total + (slip if i == len(numbers) else 0)}")
      acc = total
    prompt = "+".join(str(int(x)) for x in numbers) + "="
    return Problem(prompt, str(acc), f"<think>{','.join(steps)}</think><answer>{acc + slip}</answer>")

  def demonstrations(self, rng: np.random.Generator, n: int, error_rate: float = 0.0) -> list[dict]:
    """n SFT examples {'prompt', 'response'} of training problems, a share error_rate of them (chosen by
    rng) from a teacher whose last addition is one too high."""
    if not 0.0 <= error_rate <= 1.0:
      raise ValueError(f"error_rate={error_rate} must be in [0, 1]")
    out = []
    for p in self.sample(rng, n, "train"):
      numbers = [int(x) for x in p.prompt[:-1].split("+")]
      slip = int(rng.random() < error_rate)
      out.append({"prompt": p.prompt, "response": self.problem(numbers, slip).solution})
    return out

  def sample(self, rng: np.random.Generator, n: int, split: str = "train", *,
             distinct: bool = False) -> list[Problem]:
    """n problems of `split` drawn uniformly by rng (with `distinct`, without repetition).

    Raises:
      ValueError: an unknown split, or more distinct problems asked for than the split holds.
    """
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    space = (self.max_value + 1) ** self.terms
    if distinct and n > space * (self.eval_fraction if split == "eval" else 1 - self.eval_fraction) / 2:
      raise ValueError(f"{n} distinct {split} problems asked of a task with {space} problems in all")
    out, seen = [], set()
    while len(out) < n:
      numbers = tuple(int(x) for x in rng.integers(0, self.max_value + 1, size=self.terms))
      if self.split_of(numbers) != split or (distinct and numbers in seen):
        continue
      seen.add(numbers)
      out.append(self.problem(numbers))
    return out


def load_problems(path: str) -> list[Problem]:
  """Problems from a JSONL file of {'prompt', 'answer'[, 'solution']} objects.

  Raises:
    ValueError: missing file, no problems, or a line without a string 'prompt' / 'answer' (named by number).
  """
  recs = jsonl.read_records(
      path, valid=lambda r: isinstance(r, dict) and isinstance(r.get("prompt"), str) and "answer" in r,
      expected="an object with a string 'prompt' and an 'answer'", what="problems")
  return [Problem(r["prompt"], str(r["answer"]), str(r.get("solution", ""))) for r in recs]
