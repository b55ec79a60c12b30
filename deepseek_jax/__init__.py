"""deepseek-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, YaRN, FP8) in pure-functional JAX/Flax."""

from deepseek_jax import analysis
from deepseek_jax import data
from deepseek_jax import host_memory
from deepseek_jax import inference
from deepseek_jax import interop
from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig, RopeScaling
from deepseek_jax.inference import generate
from deepseek_jax.model import DeepSeekV3, ModelOutput, init_cache, layer_runs, to_layer_layout

__all__ = ["ModelConfig", "RopeScaling", "DeepSeekV3", "ModelOutput", "init_cache", "layer_runs",
           "to_layer_layout", "generate", "analysis", "data", "host_memory", "inference", "interop",
           "sharding"]
