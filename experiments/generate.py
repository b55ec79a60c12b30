r"""Generates text with a DeepSeek-V3-style model, streaming it as it is decoded.

  python -m experiments.generate --workdir=/tmp/run --prompt="def "
  python -m experiments.generate --hf_dir=DeepSeek-V3 --prompt="Hello" --speculative
  python -m experiments.generate --orbax_dir=ckpt/v3 --tokenizer=DeepSeek-V3 --prompt_ids=1,2,3
  python -m experiments.generate --preset=tiny --random_init --prompt="abc" --speculative

The model comes from exactly one of --workdir (a training run's newest checkpoint), --hf_dir, --orbax_dir
(written by experiments.convert) or --random_init.  Text prompts need a tokenizer: --tokenizer, else the one
saved with the model (the run's tokenizer/, or tokenizer files in --hf_dir / --orbax_dir, as experiments.convert
writes them), else with --random_init the byte tokenizer (when the preset's vocabulary holds it); without
one, give --prompt_ids and the new ids are printed.
Prints the text as it streams, then tokens/s and (with --speculative) the MTP acceptance rate on stderr.
Mistakes in the flags or the inputs (empty prompt, ids outside the vocabulary, too long a request) end with
one line `error: ...` and exit status 2.
"""

import sys

from absl import app
from absl import flags

from experiments import cli

_CONFIG = cli.DEFINE_config_file(
    "config", None, "with --workdir: the experiment config the run was trained with, for its model "
    "(default: the config.json the run saved)")
_WORKDIR = flags.DEFINE_string("workdir", None, "training run directory: newest checkpoint + its tokenizer")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + *.safetensors)")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "model checkpoint written by experiments.convert "
                                 "(HF -> orbax)")
_PRESET = flags.DEFINE_string("preset", "tiny", "with --random_init: the ModelConfig preset")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "random weights of --preset (a demo, no checkpoint)")
_SEED = flags.DEFINE_integer("seed", 0, "init seed (--random_init) and sampling seed")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json, a tokenizer directory or a saved project tokenizer (default: the one "
    "saved with the model: the workdir's tokenizer/, or the one in --hf_dir / --orbax_dir; with "
    "--random_init the byte tokenizer; else none: give --prompt_ids)")
_PROMPT = flags.DEFINE_string("prompt", None, "prompt text (needs a tokenizer)")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "prompt token ids, e.g. 1,2,3 (instead of --prompt)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "MTP speculative decoding")
_CHUNK = flags.DEFINE_integer("chunk_steps", 8, "decode steps per compiled call between text updates")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", None, ["float32", "bfloat16", "float16"],
                                 "latent cache dtype (default: the model's compute dtype)")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "stop at the end-of-sequence token (the tokenizer's, else the "
                                 "model config's eos_token_id)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prompt_ids = None
  if _PROMPT_IDS.value:
    try:
      prompt_ids = [int(i) for i in _PROMPT_IDS.value]
    except ValueError as e:
      raise app.UsageError(f"--prompt_ids={','.join(_PROMPT_IDS.value)}: expected integers like 1,2,3") from e
  if _CONFIG.value is not None and not _WORKDIR.value:
    raise app.UsageError("--config gives the model of a --workdir run; it is not used with other sources")
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from deepseek_jax.inference import run_generation  # pylint: disable=g-import-not-at-top
  model, variables, tokenizer = loading.load_for_generation(
      workdir=_WORKDIR.value, experiment_config=_CONFIG.value, hf_dir=_HF_DIR.value,
      orbax_dir=_ORBAX_DIR.value, preset=_PRESET.value if _RANDOM_INIT.value else None,
      tokenizer=_TOKENIZER.value, seed=_SEED.value)
  stats = run_generation(model, variables, tokenizer, prompt=_PROMPT.value, prompt_ids=prompt_ids,
                         max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                         top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                         speculative=_SPECULATIVE.value, chunk_steps=_CHUNK.value,
                         cache_dtype=_CACHE_DTYPE.value, stop_at_eos=_STOP_AT_EOS.value)
  line = (f"{stats['new_tokens']} tokens in {stats['steps']} steps, {stats['tokens_per_s']:.1f} tokens/s "
          f"(prefill {stats['prefill_s']:.3f} s, decode {stats['decode_s']:.3f} s, compile "
          f"{stats['compile_s']:.1f} s)")
  if _SPECULATIVE.value:
    line += (f", MTP acceptance {stats['acceptance_rate']:.3f} ({stats['accepted']}/{stats['proposed']}), "
             f"{stats['tokens_per_step']:.2f} tokens/step")
  print(line, file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
