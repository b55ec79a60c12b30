"""SFT data and loss: prompts are masked (zero gradient on their logits), one example per row, bad files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.data import ByteTokenizer
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.posttrain import (ChainSum, batch_indices, encode_example, example_rows, load_examples,
                                    response_loss)


def test_prompt_logits_get_no_gradient(micro):
  model, variables = micro
  tok = ByteTokenizer()
  examples = [{"prompt": "3+4=", "response": "7"},
              {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                            {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}]
  rows = example_rows(tok, examples, 60)
  rows = {k: jnp.asarray(v) for k, v in rows.items()}
  rows["inputs"] = rows["inputs"] % 64          # the micro model's vocabulary
  rows["targets"] = rows["targets"] % 64
  _, logits, _, _ = model.apply(variables, rows["inputs"], method=DeepSeekV3.main)
  grad = np.asarray(jax.grad(lambda lg: response_loss(lg, rows)[0])(logits))
  per_pos = np.abs(grad).sum(-1)
  mask = np.asarray(rows["mask"]) > 0
  assert np.all(per_pos[~mask] == 0)
  assert np.all(per_pos[mask] > 0)
  # Learned: the response and its eos (row 0); both assistant turns and their eos (row 1), nothing else.
  ids, learned = encode_example(tok, examples[0])
  assert tok.decode(ids[learned].tolist(), skip_special_tokens=False).startswith("7")
  assert learned.sum() == 2 and ids[-1] == tok.eos_id
  ids, learned = encode_example(tok, examples[1])
  assert learned.sum() == len("yo") + len("4") + 2
  assert "hi" not in tok.decode(ids[learned].tolist())


def test_rows_and_batches():
  tok = ByteTokenizer()
  task = ChainSum()
  probs = task.sample(np.random.default_rng(0), 10)
  rows = example_rows(tok, [{"prompt": p.prompt, "response": p.solution} for p in probs], 64)
  # One example per row: every row starts with bos, and nothing follows its eos.
  assert np.all(rows["inputs"][:, 0] == tok.bos_id)
  for i in range(10):
    eos = np.flatnonzero(rows["targets"][i] == tok.eos_id)
    assert len(eos) == 1 and rows["mask"][i, eos[0] + 1:].sum() == 0
  a = batch_indices(10, 4, 3, seed=1)
  assert np.array_equal(a, batch_indices(10, 4, 3, seed=1)) and len(set(a.tolist())) == 4
  with pytest.raises(ValueError, match="more than seq_len"):
    example_rows(tok, [{"prompt": "x" * 70, "response": "y"}], 64)
  with pytest.raises(ValueError, match="no SFT examples"):
    example_rows(tok, [], 64)


def test_task_splits_are_disjoint():
  task = ChainSum()
  train = {p.prompt for p in task.sample(np.random.default_rng(0), 300)}
  held = {p.prompt for p in task.sample(np.random.default_rng(0), 50, "eval", distinct=True)}
  assert not train & held and len(held) == 50
  p = task.problem([3, 5, 2])
  assert (p.prompt, p.answer, p.solution) == ("3+5+2=", "10", "<think>3+5=8,8+2=10</think><answer>10</answer>")


def test_load_examples_errors(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="no examples"):
    load_examples(str(empty))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    load_examples(str(bad))
  with pytest.raises(ValueError, match="no such file"):
    load_examples(str(tmp_path / "missing.jsonl"))
