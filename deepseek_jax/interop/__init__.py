"""Checkpoint interop: HF safetensors (`hf`) and the project's orbax model checkpoints (`orbax_io`)."""

from deepseek_jax.interop import hf
from deepseek_jax.interop import orbax_io
from deepseek_jax.interop.orbax_io import load_variables as load_orbax
from deepseek_jax.interop.orbax_io import save_variables as save_orbax

__all__ = ["hf", "orbax_io", "load_orbax", "save_orbax"]
