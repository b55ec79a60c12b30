"""absl entry points of deepseek-jax, run from the repository root (`python -m experiments.X`)."""
