"""Parameter, FLOP, memory and cost accounting, and where a compiled step spends its time."""

from deepseek_jax.analysis import cost, flops, hardware, profile
from deepseek_jax.analysis.cost import cost_report, estimate_run, fleet_view, implied_mfu, table1
from deepseek_jax.analysis.flops import (decode_flops_per_token, forward_flops_per_token,
                                         kv_cache_bytes_per_token, kv_cache_elements_per_token,
                                         train_flops_per_token)
from deepseek_jax.analysis.hardware import GPUS, get_gpu, gpu_for_device
from deepseek_jax.analysis.params import abstract_variables, count_params
from deepseek_jax.analysis.profile import Profile, TraceWindow, profile_ops, summarize
