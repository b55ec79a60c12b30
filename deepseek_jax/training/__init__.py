"""Training: losses, load balancing, optimizer and schedules, train state and step, checkpoints, metrics, loop."""

from deepseek_jax.training.balance import bias_paths, bias_stats, load_imbalance, update_bias
from deepseek_jax.training.checkpoint import Checkpointer, verify_step
from deepseek_jax.training.config import default_config, model_config
from deepseek_jax.training.errors import CheckpointError, UserError
from deepseek_jax.training.losses import cross_entropy, mtp_cross_entropy, objective
from deepseek_jax.training.metrics import MetricsWriter, read_metrics
from deepseek_jax.training.optimizer import (Schedules, check_optimizer_config, decay_mask, make_optimizer,
                                             schedules_from_config)
from deepseek_jax.training.rundir import RunLock, check_same_run, resolved_config
from deepseek_jax.training.sample import sample_text, sample_tokens
from deepseek_jax.training.state import TrainState, create_state, init_state
from deepseek_jax.training.step import make_eval_step, make_train_step
from deepseek_jax.training.trainer import TrainingDiverged, evaluate, load_init_variables, train

__all__ = [
    "CheckpointError", "Checkpointer", "MetricsWriter", "RunLock", "Schedules", "TrainState",
    "TrainingDiverged", "UserError", "bias_paths", "bias_stats", "check_optimizer_config", "check_same_run",
    "create_state", "cross_entropy", "decay_mask", "default_config", "evaluate", "init_state",
    "load_imbalance", "load_init_variables", "make_eval_step", "make_optimizer", "make_train_step",
    "model_config", "mtp_cross_entropy", "objective", "read_metrics", "resolved_config", "sample_text",
    "sample_tokens", "schedules_from_config", "train", "update_bias", "verify_step",
]
