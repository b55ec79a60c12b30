"""Streaming decoded text while `generate` runs (its `on_tokens` callback)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np


class TextStreamer:
  """An `on_tokens` callback that writes one row's text as it grows.

  Each call re-decodes the row's tokens so far and writes only the new suffix of the text, so multi-byte
  characters and merges that a later token completes come out right (a trailing U+FFFD of an incomplete
  UTF-8 sequence is held back until the next call).  Ids the tokenizer does not have (a model vocabulary
  padded past the tokenizer's, or an untrained model) are written as <id:N>.

  Args:
    tokenizer: anything with `decode(ids) -> str`.
    row: the batch row to print.
    out: the text stream (default sys.stdout).
  """

  def __init__(self, tokenizer: Any, row: int = 0, out: TextIO | None = None):
    self.tokenizer = tokenizer
    self.row = row
    self.out = out or sys.stdout
    self.ids: list[int] = []
    self.text = ""

  def __call__(self, new_tokens: list) -> None:
    """Receives the per-row lists of new token ids from `generate`."""
    self.ids.extend(int(t) for t in np.asarray(new_tokens[self.row]).tolist())
    text = self.decode(self.ids)
    stable = text[:-1] if text.endswith("\ufffd") else text
    if stable.startswith(self.text) and len(stable) > len(self.text):
      self.out.write(stable[len(self.text):])
      self.out.flush()
      self.text = stable

  def decode(self, ids) -> str:
    """Text of ids; runs of known ids go through the tokenizer, unknown ids become <id:N>."""
    vocab = self.tokenizer.vocab_size
    parts, run = [], []
    for t in ids:
      if 0 <= t < vocab:
        run.append(t)
        continue
      if run:
        parts.append(self.tokenizer.decode(run))
        run = []
      parts.append(f"<id:{t}>")
    if run:
      parts.append(self.tokenizer.decode(run))
    return "".join(parts)

  def finish(self) -> str:
    """Writes whatever is left (and a newline); returns the whole text."""
    text = self.decode(self.ids)
    if text.startswith(self.text):
      self.out.write(text[len(self.text):])
    self.out.write("\n")
    self.out.flush()
    self.text = text
    return text


def run_generation(model, variables, tokenizer, *, prompt: str | None = None, prompt_ids=None,
                   max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, speculative: bool = False, chunk_steps: int = 8, cache_dtype=None,
                   stop_at_eos: bool = True, out: TextIO | None = None) -> dict:
  """Generates from one prompt and streams the text (or the ids, without a tokenizer) to `out`.

  Args:
    model, variables: the model.
    tokenizer: a `deepseek_jax.data` tokenizer, or None (then prompt_ids are required and ids are printed);
      with a tokenizer and no prompt_ids, the prompt text is encoded.
    prompt, prompt_ids: the prompt as text or as ids (exactly one).
    max_new_tokens, temperature, top_k, top_p, speculative, chunk_steps, cache_dtype: see `generate`.
    seed: sampling seed.
    stop_at_eos: stop at the tokenizer's EOS (else at the model config's eos_token_id when no tokenizer).
    out: the text stream (default sys.stdout).
  Returns:
    `generate`'s statistics, plus 'text' (or 'ids').
  Raises:
    ValueError: no prompt or both, an empty prompt, ids outside the vocabulary, a tokenizer whose vocabulary
      exceeds the model's, or a request beyond max_position_embeddings.
  """
  from deepseek_jax.inference.generate import generate, prepare_prompts  # pylint: disable=g-import-not-at-top
  out = out or sys.stdout
  cfg = model.cfg
  if (prompt is None) == (prompt_ids is None):
    raise ValueError("give exactly one of a prompt text and prompt ids")
  if prompt is not None:
    if tokenizer is None:
      raise ValueError("a text prompt needs a tokenizer (or pass prompt ids)")
    prompt_ids = tokenizer.encode(prompt)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size={cfg.vocab_size}")
  prepare_prompts(cfg, np.asarray(prompt_ids).reshape(1, -1), None, max_new_tokens)  # clear errors first
  eos = None
  if stop_at_eos:
    eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
  ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
  if tokenizer is not None:
    streamer = TextStreamer(tokenizer, out=out)
    out.write(streamer.decode(ids[0].tolist()))
  else:
    def streamer(new_tokens):
      out.write("".join(f" {int(t)}" for t in np.asarray(new_tokens[0]).tolist()))
      out.flush()
    out.write(" ".join(str(int(t)) for t in ids[0].tolist()) + " |")
  new, stats = generate(model, variables, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, rng=seed, speculative=speculative, eos_id=eos,
                        cache_dtype=cache_dtype, return_stats=True, on_tokens=streamer,
                        chunk_steps=chunk_steps)
  if tokenizer is not None:
    streamer.finish()
    stats["text"] = streamer.text
  else:
    out.write("\n")
  stats["ids"] = np.asarray(new)[0, :stats["new_tokens"]].tolist()
  return stats
