"""Post-training: SFT, GRPO with rule-based rewards, routing replay for MoE policies, a verifiable task."""

from deepseek_jax.posttrain.config import default_config
from deepseek_jax.posttrain.grpo import (NORMALIZATIONS, GRPOLoss, group_advantages, grpo_loss, k3_kl,
                                         token_log_probs)
from deepseek_jax.posttrain.policy import forward_log_probs, make_grpo_step, make_score_fn
from deepseek_jax.posttrain.replay import expert_mismatch, experts_of, replay_collection
from deepseek_jax.posttrain.rewards import (BUILTIN, RewardError, answer_reward, extract_answer,
                                            format_reward, resolve, score)
from deepseek_jax.posttrain.rollout import Rollout, encode_prompts, evaluate_accuracy, sample_groups
from deepseek_jax.posttrain.run import run_grpo, run_sft
from deepseek_jax.posttrain.sft import (batch_indices, encode_example, example_rows, load_examples,
                                        make_sft_step, render_chat, response_loss, sft_loss)
from deepseek_jax.posttrain.tasks import ChainSum, Problem, load_problems

__all__ = [
    "BUILTIN", "ChainSum", "GRPOLoss", "NORMALIZATIONS", "Problem", "RewardError", "Rollout", "answer_reward",
    "batch_indices", "default_config", "encode_example", "encode_prompts", "evaluate_accuracy",
    "example_rows", "expert_mismatch", "experts_of", "extract_answer", "format_reward", "forward_log_probs",
    "group_advantages", "grpo_loss", "k3_kl", "load_examples", "load_problems", "make_grpo_step",
    "make_score_fn", "make_sft_step", "render_chat", "replay_collection", "resolve", "response_loss",
    "run_grpo", "run_sft", "sample_groups", "score", "sft_loss", "token_log_probs",
]
