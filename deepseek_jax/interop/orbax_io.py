"""The project's model checkpoint format: one directory with the model config and the variables.

    DIR/model_config.json   every ModelConfig field (dataclasses.asdict), read back with ModelConfig(**d)
    DIR/variables/          the variables pytree ({'params', 'router'}) written by orbax StandardCheckpointer

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


def save_variables(directory, cfg: ModelConfig, variables) -> str:
  """Writes cfg and variables under `directory` (created; must not already hold a checkpoint).

  Args:
    directory: output directory.
    cfg: the model config.
    variables: the model's variables (jax or NumPy arrays, any sharding).
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
  return directory


def load_config(directory) -> ModelConfig:
  """The ModelConfig stored in a checkpoint directory."""
  fn = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.exists(fn):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a deepseek_jax model checkpoint")
  with open(fn) as f:
    return ModelConfig(**json.load(f))


def load_variables(directory, *, mesh=None, rules: Optional[Sequence] = None):
  """Reads a checkpoint written by `save_variables`.

  Args:
    directory: the checkpoint directory.
    mesh: optional mesh to restore onto (shardings from the logical axis rules); None: default device.
    rules: logical-axis rules for the mesh; None: `sharding.LOGICAL_RULES`.
  Returns:
    (cfg, variables) in `DeepSeekV3(cfg).init`'s structure.
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
  ckptr = ocp.StandardCheckpointer()
  variables = ckptr.restore(os.path.join(directory, VARIABLES_DIR), abstract)
  ckptr.close()
  return cfg, variables
