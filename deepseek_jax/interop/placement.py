"""Where each variable of a model goes on a device mesh, for checkpoint loading: the model's shardings by
its ModelConfig.

A thin layer over `deepseek_jax.sharding`, which owns the logical-axis rules and the divisibility fitting
(`sharding.fit_spec`): here the model is named by its config, as the checkpoint readers know it.  The
variables' shardings are those the training state gives its parameters (`sharding.train_state_sharding`),
so a checkpoint loaded onto a mesh is already laid out for training on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import DeepSeekV3


def _model(cfg: ModelConfig):
  return DeepSeekV3(cfg)


def _tokens():
  return jnp.zeros((1, 1), jnp.int32)


def boxed_abstract_variables(cfg: ModelConfig):
  """The model's variables with their logical-partitioning boxes, as shapes only (jax.eval_shape).

  Args:
    cfg: the model config.
  Returns:
    `DeepSeekV3(cfg).init`'s tree with `nn.Partitioned` boxes around jax.ShapeDtypeStruct leaves.
  """
  return sharding.boxed_abstract_variables(_model(cfg), _tokens())


def abstract_variables(cfg: ModelConfig):
  """`DeepSeekV3(cfg).init`'s tree (plain arrays) as jax.ShapeDtypeStruct leaves.

  Args:
    cfg: the model config.
  Returns:
    {'params': ..., 'router': ...} of jax.ShapeDtypeStruct.
  """
  return nn.unbox(boxed_abstract_variables(cfg))


def variable_shardings(cfg: ModelConfig, mesh: Mesh, rules: Optional[Sequence] = None):
  """A NamedSharding for every variable of `DeepSeekV3(cfg)` (same tree as `init`).

  Mesh axes of size 1 or absent from `mesh` are dropped from the rules, and an axis that does not divide a
  dimension is dropped from it (`sharding.fit_spec`).

  Args:
    cfg: the model.
    mesh: the device mesh (any subset of the axes data, fsdp, expert, tensor).
    rules: (logical name, mesh axis or None) pairs; None takes `sharding.LOGICAL_RULES`.
  Returns:
    A tree of NamedSharding with the structure of the model's variables.
  """
  rules = sharding.LOGICAL_RULES if rules is None else tuple(rules)
  return sharding.variable_shardings(_model(cfg), mesh, _tokens(), rules=rules)
