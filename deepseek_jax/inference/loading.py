"""Where generation gets a model from: a training workdir, an HF checkpoint, or a preset's random init.

- Training workdir (`python -m experiments.train --workdir=DIR`): orbax checkpoints under DIR/checkpoints
  (one step per subdirectory, items 'state' = the TrainState and 'meta'), the tokenizer in DIR/tokenizer.
  The checkpoint does not record the ModelConfig, so it comes from the experiment config the run was
  trained with, or from an HF-style DIR/config.json when one is there.  Only the model variables
  ({'params', 'router'}) are kept from the train state; they are checked against the model's own shapes.
  A step is read only after its files match its checksums.json (`deepseek_jax.training.verify_step`; steps
  of runs that wrote none are read as they are); the default is the newest step that verifies, and nothing in
  the workdir is renamed or written.
- HF checkpoint: `deepseek_jax.interop.hf.load`; the tokenizer saved beside it, if any.
- The project's model checkpoint (`deepseek_jax.interop.orbax_io`); the tokenizer saved beside it, if any.
- A preset with random weights (demos and benchmarks).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import DeepSeekV3, to_layer_layout


def init_variables(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random variables of DeepSeekV3(cfg) (jitted init)."""
  model = DeepSeekV3(cfg)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))


def check_like(where: str, abstract, variables) -> dict:
  """variables cast to abstract's dtypes, after checking its structure and every shape."""
  want = jax.tree_util.tree_structure(abstract)
  got = jax.tree_util.tree_structure(variables)
  if want != got:
    have = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    need = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    missing, extra = sorted(need - have)[:3], sorted(have - need)[:3]
    raise ValueError(f"{where}: the checkpoint's variables do not match the model config "
                     f"({got.num_leaves} arrays, the model has {want.num_leaves}; missing e.g. {missing}, "
                     f"unexpected e.g. {extra})")
  leaves = []
  for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(variables)):
    if tuple(a.shape) != tuple(np.shape(b)):
      raise ValueError(f"{where}: {jax.tree_util.keystr(kp)} has shape {tuple(np.shape(b))}, the model "
                       f"expects {tuple(a.shape)}")
    leaves.append(jnp.asarray(b, a.dtype))
  return jax.tree_util.tree_unflatten(want, leaves)


def workdir_config(workdir: str) -> Optional[ModelConfig]:
  """The ModelConfig stored in workdir/config.json (HF layout), or None when there is none."""
  path = os.path.join(workdir, "config.json")
  return ModelConfig.from_hf(path) if os.path.isfile(path) else None


def _verified_step(directory: str, steps: list[int], step: Optional[int]) -> int:
  """`step` once its checksums match, or (None) the newest step whose checksums match; a damaged step
  skipped is named in one warning line."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.checkpoint import verify_step  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.errors import CheckpointError  # pylint: disable=g-import-not-at-top
  if step is not None:
    verify_step(os.path.join(directory, str(step)))   # a CheckpointError names the damaged file
    return step
  reasons = []
  for i in range(len(steps) - 1, -1, -1):
    try:
      verify_step(os.path.join(directory, str(steps[i])))
      return steps[i]
    except CheckpointError as e:
      reasons.append(str(e))
      nxt = f"using step {steps[i - 1]}" if i > 0 else "no older step"
      logging.warning("checkpoint %s/%d is damaged (%s); %s", directory, steps[i], e, nxt)
  raise CheckpointError(f"no checkpoint in {directory} matches its checksums (steps {steps}; newest: "
                        f"{reasons[0]})")


def load_workdir(workdir: str, cfg: Optional[ModelConfig] = None, *, step: Optional[int] = None):
  """Variables of the newest verified (or a given) checkpoint of a training workdir; reads only.

  Args:
    workdir: the run directory given to `experiments.train`.
    cfg: the model config of the run (e.g. `deepseek_jax.training.model_config(experiment_config)`);
      None: read workdir/config.json.
    step: a saved step (default: the newest whose files match their checksums; damaged newer steps are
      named in a warning and skipped).
  Returns:
    (cfg, variables {'params', 'router'}, step).
  Raises:
    FileNotFoundError: no workdir, no checkpoints, no such step.
    ValueError: no model config, or variables that do not fit it.
    deepseek_jax.training.CheckpointError: `step` (or, with none given, every step) fails its checksums;
      the message names the damaged file.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} " + ("is not a directory" if os.path.exists(workdir)
                                                      else "does not exist"))
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoints directory in the workdir")
  if cfg is None:
    cfg = workdir_config(workdir)
    if cfg is None:
      raise ValueError(f"workdir {workdir} records no model config (no config.json): pass the experiment "
                       "config the run was trained with")
  manager = ocp.CheckpointManager(directory)
  try:
    steps = sorted(manager.all_steps())   # step directories only: '<step>.damaged' ones are not listed
    if not steps:
      raise FileNotFoundError(f"{directory}: no saved checkpoint")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{directory}: no checkpoint for step {step} (saved: {steps})")
    step = _verified_step(directory, steps, step)
    # No target: the train state comes back as saved (nested dicts of arrays); only the variables are kept.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  state = restored["state"]
  if not isinstance(state, dict) or "params" not in state:
    raise ValueError(f"{directory}/{step}: the saved state holds no 'params'")
  variables = to_layer_layout(cfg, {"params": state["params"], "router": state.get("router") or {}},
                              donate=True)
  abstract = jax.eval_shape(DeepSeekV3(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  abstract = {"params": abstract["params"], "router": abstract.get("router", {})}
  return cfg, check_like(f"{directory}/{step}", abstract, variables), step


def load_workdir_tokenizer(workdir: str):
  """The tokenizer a training run saved (workdir/tokenizer), via `deepseek_jax.data.load_tokenizer`."""
  from deepseek_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "tokenizer")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: the workdir holds no saved tokenizer; pass one explicitly")
  return load_tokenizer(path)


def saved_tokenizer(directory: str):
  """The tokenizer saved in a checkpoint folder (HF, or the project's model checkpoint), or None; its files,
  like every file of a checkpoint, must be regular files inside the folder (else `hf.CheckpointError`).

  What `deepseek_jax.data.find_tokenizer` finds there: a tokenizer.json, or a byte tokenizer's
  tokenizer_config.json (`experiments.convert` saves the source's tokenizer beside what it writes).
  """
  from deepseek_jax.data import find_tokenizer  # pylint: disable=g-import-not-at-top
  from deepseek_jax.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  for name in ("tokenizer.json", "tokenizer_config.json"):
    path = os.path.join(directory, name)
    if os.path.lexists(path):  # inside the folder and a regular file, else refused
      safetensors_io.open_regular(safetensors_io.resolve_inside(directory, name, path), path).close()
  return find_tokenizer(directory)


def load_for_generation(*, workdir: Optional[str] = None, experiment_config=None,
                        hf_dir: Optional[str] = None, orbax_dir: Optional[str] = None,
                        preset: Optional[str] = None, tokenizer: Optional[str] = None, seed: int = 0):
  """(model, variables, tokenizer or None) from exactly one source.

  Args:
    workdir: a training run directory (`load_workdir`: its newest verified checkpoint; its tokenizer unless
      `tokenizer` is given).
    experiment_config: with workdir, the experiment ConfigDict of the run (gives the ModelConfig).
    hf_dir: an HF checkpoint directory (`deepseek_jax.interop.hf.load`); its `saved_tokenizer`, if any.
    orbax_dir: a model checkpoint of `experiments.convert` (`deepseek_jax.interop.orbax_io`); its
      `saved_tokenizer`, if any.
    preset: a ModelConfig preset with random weights (seeded by `seed`); with the byte tokenizer (the
      training default) when its vocabulary fits.
    tokenizer: a tokenizer path for `deepseek_jax.data.load_tokenizer` (overrides the source's own).
    seed: init seed for `preset`.
  Returns:
    (DeepSeekV3 model, variables, tokenizer or None when no source provides one).
  Raises:
    ValueError: no source or several (an untrusted HF checkpoint's problems are
      `deepseek_jax.interop.hf.CheckpointError`, a ValueError); FileNotFoundError: missing files.
  """
  from deepseek_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  sources = {"workdir": workdir, "hf_dir": hf_dir, "orbax_dir": orbax_dir, "preset (random init)": preset}
  given = [k for k, v in sources.items() if v]
  if len(given) != 1:
    raise ValueError(f"give exactly one model source of {list(sources)}; got {given or 'none'}")
  tok = None
  if workdir:
    cfg = None
    if experiment_config is not None:
      from deepseek_jax.training import model_config  # pylint: disable=g-import-not-at-top
      cfg = model_config(experiment_config)
    cfg, variables, _ = load_workdir(workdir, cfg)
    if tokenizer is None and os.path.exists(os.path.join(workdir, "tokenizer")):
      tok = load_workdir_tokenizer(workdir)
  elif hf_dir:
    from deepseek_jax.interop import hf  # pylint: disable=g-import-not-at-top
    tok = saved_tokenizer(hf_dir) if tokenizer is None else None
    cfg, variables = hf.load(hf_dir)
  elif orbax_dir:
    from deepseek_jax.interop import orbax_io  # pylint: disable=g-import-not-at-top
    tok = saved_tokenizer(orbax_dir) if tokenizer is None else None
    cfg, variables = orbax_io.load_variables(orbax_dir)
  else:
    cfg = ModelConfig.preset(preset)
    variables = init_variables(cfg, seed)
    from deepseek_jax.data import ByteTokenizer  # pylint: disable=g-import-not-at-top
    if ByteTokenizer().vocab_size <= cfg.vocab_size:   # the training default; text in, text out
      tok = ByteTokenizer()
  if tokenizer is not None:
    tok = load_tokenizer(tokenizer)
  return DeepSeekV3(cfg), variables, tok
