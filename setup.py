"""deepseek-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP, YaRN, FP8) in JAX/Flax with Pallas kernels."""

from setuptools import find_packages, setup

setup(
    name="deepseek-jax",
    version="0.1.0",
    description="DeepSeek-V3 in pure-functional JAX/Flax with Pallas kernels for MLA and expert dispatch",
    packages=find_packages(include=["deepseek_jax", "deepseek_jax.*", "kernels", "kernels.*"]),
    package_data={"kernels": ["*.cc", "*.h"]},   # the opt-in host (CPU) kernels compile these when chosen
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "einops>=0.8",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "chex>=0.1.88",
            "torch==2.13.0",
            "transformers==5.24.0",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
        ],
        "notebooks": ["jupyter", "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.10",
                      "ipykernel>=6.29"],
        "parity": ["torch==2.13.0", "transformers==5.24.0"],
        # The opt-in host (CPU) kernels (ModelConfig.*_impl='host'): MKL's static libraries, linked in where
        # present (kernels.host_build); they also need a C++ compiler.
        "cpu": ["mkl-static>=2024; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
)
