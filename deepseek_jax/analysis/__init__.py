"""Parameter, FLOP, memory and cost accounting."""

from deepseek_jax.analysis.params import abstract_variables, count_params
