"""Inference: latent KV cache prefill/decode, sampling, and MTP speculative decoding."""

from deepseek_jax.inference.cache import cache_bytes_per_token, mha_cache_bytes_per_token
from deepseek_jax.inference.generate import generate, prepare_prompts
from deepseek_jax.inference.sampling import SamplingParams, filter_logits, probabilities, sample
from deepseek_jax.inference.speculative import accept_greedy, accept_sampled
from deepseek_jax.inference.streaming import TextStreamer, run_generation
from deepseek_jax.inference.loading import load_for_generation, load_workdir

__all__ = ["SamplingParams", "TextStreamer", "accept_greedy", "accept_sampled", "cache_bytes_per_token",
           "filter_logits", "generate", "load_for_generation", "load_workdir", "mha_cache_bytes_per_token",
           "prepare_prompts", "probabilities", "run_generation", "sample"]
