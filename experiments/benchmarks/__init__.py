"""Benchmark suites for `python -m experiments.bench`; each module exposes `run(flags) -> dict`."""
