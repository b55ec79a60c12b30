"""Generation from a training workdir: the newest orbax checkpoint and the saved tokenizer, streamed as text."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.data import ByteTokenizer
from deepseek_jax.inference import TextStreamer, generate, load_for_generation, run_generation
from deepseek_jax.training import Checkpointer, create_state, default_config

from tests.inference.conftest import aligned_model


def test_workdir_checkpoint_generates_like_its_variables(tmp_path):
  model, variables = aligned_model(1)
  workdir = str(tmp_path)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  stale = jax.tree.map(jnp.zeros_like, variables)           # an older step: must not be the one loaded
  ckpt.save(1, create_state(stale, optax.adam(1e-3), jax.random.PRNGKey(0)), {"step": 1})
  ckpt.save(7, create_state(variables, optax.adam(1e-3), jax.random.PRNGKey(0)), {"step": 7})
  ckpt.close()
  ByteTokenizer().save(os.path.join(workdir, "tokenizer"))
  config = default_config()
  config.model.num_hidden_layers = 2

  loaded, loaded_vars, tok = load_for_generation(workdir=workdir, experiment_config=config)
  assert loaded.cfg == model.cfg and isinstance(tok, ByteTokenizer)
  jax.tree.map(np.testing.assert_array_equal, loaded_vars, variables)

  out = io.StringIO()
  stats = run_generation(loaded, loaded_vars, tok, prompt="def f(x):", max_new_tokens=8, chunk_steps=3,
                         cache_dtype="float32", stop_at_eos=False, out=out)
  expected = np.asarray(generate(model, variables, tok.encode("def f(x):"), max_new_tokens=8,
                                 cache_dtype=jnp.float32))[0]
  assert stats["ids"] == expected.tolist()
  # The stream is the prompt, then the new tokens' text (ids the byte tokenizer lacks shown as <id:N>).
  assert out.getvalue() == "def f(x):" + stats["text"] + "\n"
  assert stats["text"] == TextStreamer(tok).decode(expected.tolist())
  assert stats["new_tokens"] == 8

  with pytest.raises(ValueError, match="records no model config"):
    load_for_generation(workdir=workdir)
  with pytest.raises(ValueError, match="exactly one model source"):
    load_for_generation(workdir=workdir, preset="tiny")
  config.model.num_hidden_layers = 3
  with pytest.raises(ValueError, match="do not match the model config"):
    load_for_generation(workdir=workdir, experiment_config=config)


def test_text_streamer_holds_back_partial_characters():
  out = io.StringIO()
  streamer = TextStreamer(ByteTokenizer(), out=out)
  streamer([[104, 105, 195]])            # "hi" + the first byte of "é"
  assert out.getvalue() == "hi"
  streamer([[169, 300]])                 # the second byte; 300 is not a byte-tokenizer id
  assert out.getvalue() == "hi\u00e9<id:300>"
  assert streamer.finish() == "hi\u00e9<id:300>" and out.getvalue().endswith("\n")
