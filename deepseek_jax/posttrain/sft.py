"""Supervised fine-tuning: prompt/response pairs or chat turns, loss on response tokens only.

Data: JSONL, one example per line, either {'prompt': str, 'response': str} or {'messages': [{'role',
'content'}, ...]} (chat turns; the assistant turns are learned).  Chat turns are rendered by the tokenizer's
own `apply_chat_template(messages) -> [(text, learned)]` when it has one, else by `render_chat`.

Each example is [bos] + prompt + response + [eos] with the loss on the response and its eos.  Rows hold one
example each (right-padded, padding masked out of the loss): attention in this model is causal over the whole
row, so this is what guarantees that no token ever attends to another example.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax.data import jsonl
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.training import balance as balance_lib
from deepseek_jax.training.losses import cross_entropy


def load_examples(path: str) -> list[dict]:
  """The examples of a JSONL file.

  Raises:
    ValueError: missing file, no examples, or a line that is neither kind (named by line number).
  """
  def valid(rec):
    return isinstance(rec, dict) and (
        (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str))
        or (isinstance(rec.get("messages"), list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in rec["messages"])))
  return jsonl.read_records(path, valid=valid, what="examples",
                            expected="{'prompt', 'response'} strings or 'messages' [{'role', 'content'}, ...]")


def render_chat(messages: Sequence[dict]) -> list[tuple[str, bool]]:
  """The default chat template: '<|role|>' + content per turn, each turn ended by a newline (assistant
  turns by the tokenizer's eos, added by `encode_example`); returns (text, learned) segments."""
  out = []
  for m in messages:
    assistant = m["role"] == "assistant"
    out.append((f"<|{m['role']}|>", False))
    out.append((m["content"], assistant))
    if not assistant:
      out.append(("\n", False))
  return out


def encode_example(tokenizer, example: dict) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], learned bool [n]) of one example: bos, then its segments, eos after learned ones."""
  if "messages" in example:
    template = getattr(tokenizer, "apply_chat_template", None)
    segments = template(example["messages"]) if template is not None else render_chat(example["messages"])
  else:
    segments = [(example["prompt"], False), (example["response"], True)]
  ids, learned = [tokenizer.bos_id], [False]
  for text, is_learned in segments:
    piece = list(tokenizer.encode(text))
    if is_learned:
      piece.append(tokenizer.eos_id)
    ids += piece
    learned += [is_learned] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(learned, bool)


def example_rows(tokenizer, examples: Sequence[dict], seq_len: int) -> dict:
  """One example per row: {'inputs', 'targets' int32 [N, seq_len], 'mask' float32 [N, seq_len]}.

  mask[i, t] = 1 when targets[i, t] (token t + 1 of the example) is a learned token.

  Raises:
    ValueError: no examples, an example longer than seq_len + 1 tokens, or one with nothing to learn.
  """
  if not examples:
    raise ValueError("no SFT examples")
  n = len(examples)
  inputs = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  targets = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  for i, ex in enumerate(examples):
    ids, learned = encode_example(tokenizer, ex)
    if len(ids) > seq_len + 1:
      raise ValueError(f"example {i} has {len(ids)} tokens, more than seq_len + 1 = {seq_len + 1}")
    if not learned.any():
      raise ValueError(f"example {i} has no response / assistant tokens to learn")
    m = len(ids) - 1
    inputs[i, :m] = ids[:-1]
    targets[i, :m] = ids[1:]
    mask[i, :m] = learned[1:]
  return {"inputs": inputs, "targets": targets, "mask": mask}


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of batch `step`: epochs of a permutation seeded by (seed, epoch), so any step is reproducible."""
  per_epoch = max(num_rows // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  order = np.resize(order, max(num_rows, batch_size))
  return order[k * batch_size:(k + 1) * batch_size]


def response_loss(logits, batch: dict):
  """(mean cross-entropy over the learned tokens, their count) of logits [B, S, V] for a batch of rows."""
  total, count = cross_entropy(logits, batch["targets"], batch["mask"])
  return total / jnp.maximum(count, 1.0), count


def sft_loss(model: DeepSeekV3, variables, batch: dict, *, alpha: float = 0.0):
  """Masked next-token cross-entropy (mean over learned tokens) + alpha x mean sequence-wise balance loss.

  Returns:
    (loss, {'ce', 'balance', 'tokens'}, tokens_per_expert [L_moe, E] or [0, 1]).
  """
  _, logits, stats, _ = model.apply(variables, batch["inputs"], method=DeepSeekV3.main)
  ce, count = response_loss(logits, batch)
  stats = [s for s in stats if s is not None]
  balance = jnp.mean(jnp.stack([s["balance_loss"] for s in stats])) if stats else jnp.float32(0.0)
  tpe = (jnp.stack([s["tokens_per_expert"] for s in stats]) if stats else jnp.zeros((0, 1), jnp.float32))
  return ce + alpha * balance, {"ce": ce, "balance": balance, "tokens": count}, tpe


def make_sft_step(model: DeepSeekV3, tx: optax.GradientTransformation, *, lr: float, alpha: float = 0.0,
                  gamma: float = 0.0, state_sharding=None):
  """The jitted SFT step: step(state, batch) -> (state, metrics).

  Args:
    model: the policy.
    tx: optimizer from `training.make_optimizer`.
    lr: learning rate (constant).
    alpha: sequence-wise balance-loss weight (0: off).
    gamma: routing-bias update speed (0: biases frozen).
    state_sharding: TrainState-shaped shardings, or None.
  """

  def loss_fn(params, router, batch):
    loss, parts, tpe = sft_loss(model, {"params": params, "router": router}, batch, alpha=alpha)
    return loss, (parts, tpe)

  def step(state, batch):
    (loss, (parts, tpe)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.router, batch)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    router = balance_lib.update_bias(state.router, tpe, gamma) if gamma and tpe.shape[0] else state.router
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}
    return state.replace(step=state.step + 1, params=params, router=router, opt_state=opt), metrics

  kwargs = {} if state_sharding is None else {"out_shardings": (state_sharding, None)}
  return jax.jit(step, donate_argnums=(0,), **kwargs)
