"""The project's model checkpoint format: one directory with the model config and the variables.

    DIR/model_config.json   every ModelConfig field (dataclasses.asdict), read back with ModelConfig(**d)
    DIR/variables/          the variables pytree ({'params', 'router'}) written by orbax StandardCheckpointer
    DIR/tokenizer*.json     optional: the model's tokenizer, as its `save(DIR)` writes it (read back with
                            `deepseek_jax.data.find_tokenizer`)

This is what `python -m experiments.convert` writes from an HF checkpoint and what training (`--init_from`)
and generation read.  Restoring can place every array straight onto a mesh (orbax reads each shard).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import jax
import orbax.checkpoint as ocp

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.placement import abstract_variables, variable_shardings

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def config_to_dict(cfg: ModelConfig) -> dict:
  """Every field of cfg as JSON-able values (rope_scaling as a dict)."""
  return dataclasses.asdict(cfg)


def save_variables(directory, cfg: ModelConfig, variables, tokenizer=None) -> str:
  """Writes cfg and variables under `directory` (created; must not already hold a checkpoint).

  Args:
    directory: output directory.
    cfg: the model config.
    variables: the model's variables (jax or NumPy arrays, any sharding).
    tokenizer: optional `deepseek_jax.data` tokenizer saved beside them.
  Returns:
    The absolute directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists")
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, variables)
  ckptr.wait_until_finished()
  ckptr.close()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(cfg), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(directory)
  return directory


def load_config(directory) -> ModelConfig:
  """The ModelConfig stored in a checkpoint directory.

  Raises:
    FileNotFoundError: no model_config.json.
    ValueError: one that is not JSON, has unknown fields or invalid values (the message names the file).
  """
  fn = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(fn):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a deepseek_jax model checkpoint")
  try:
    with open(fn, encoding="utf-8") as f:
      d = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{fn} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{fn}: expected a JSON object of ModelConfig fields, found {type(d).__name__}")
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise ValueError(f"{fn}: {unknown} are not ModelConfig fields")
  try:
    return ModelConfig(**d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {e}") from e


def load_variables(directory, *, mesh=None, rules: Optional[Sequence] = None):
  """Reads a checkpoint written by `save_variables`.

  Args:
    directory: the checkpoint directory.
    mesh: optional mesh to restore onto (shardings from the logical axis rules); None: default device.
    rules: logical-axis rules for the mesh; None: `sharding.LOGICAL_RULES`.
  Returns:
    (cfg, variables) in `DeepSeekV3(cfg).init`'s structure.
  Raises:
    FileNotFoundError: no model_config.json or variables/.
    ValueError: an invalid model_config.json, or variables that do not restore into its model.
  """
  directory = os.path.abspath(os.fspath(directory))
  cfg = load_config(directory)
  abstract = abstract_variables(cfg)
  if mesh is not None:
    shardings = variable_shardings(cfg, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  target = os.path.join(directory, VARIABLES_DIR)
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{target}: no variables directory in the model checkpoint")
  ckptr = ocp.StandardCheckpointer()
  try:
    variables = ckptr.restore(target, abstract)
  except (ValueError, KeyError, TypeError, OSError) as e:
    # orbax's own errors for a damaged or mismatched checkpoint: the message names it, one line.
    raise ValueError(f"{target}: cannot restore the variables of {CONFIG_FILE}'s model "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  finally:
    ckptr.close()
  return cfg, variables
