"""The one place that picks implementations: every 'auto' of a ModelConfig made concrete, every choice checked.

`resolve(cfg, backend=, mesh=, dtype=)` returns an `Impls` of concrete choices for the attention of the
training / prefill path, the absorbed decode attention, the routed experts, the projections' matmul and the
Pallas interpret mode; `resolve_config` returns the config with those choices in its fields, which is what
the layers and ops receive.  The train and eval steps and the generator call it once when they are built
(it logs one line of what it chose); `DeepSeekV3` calls it when traced with a config that still says 'auto'.
A combination that cannot run raises a ValueError naming the field and value, never runs something else.

'auto' means the XLA / jnp path the model files show, except on a GPU, where the table `GPU` below picks
Pallas kernels op by op.  The host kernels (`kernels.host_*`, CPU float32 on one device) are an opt-in
backend: chosen only by name ('host'), and only then built and loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional

import jax

from deepseek_jax.config import ModelConfig
from kernels import _common

_log = logging.getLogger(__name__)

# What 'auto' is on a GPU, one line per op (change one line to change that op's default).
GPU = {
    "attention": "pallas",   # kernels.mla_attention (flash attention)
    "decode": "pallas",      # kernels.mla_decode
    "moe": "pallas",         # kernels.grouped_matmul.gmm: compiles for sm_90a; XLA:GPU expands ragged_dot densely
    "matmul": "xla",         # jnp.dot
}
# What 'auto' is on every other backend (CPU, TPU): the XLA / jnp path.
XLA = {
    "attention": "xla",      # ops.attention.causal_attention
    "decode": "xla",         # kernels.mla_decode.mla_decode_reference
    "moe": "blocked",        # ops.moe_dispatch.blocked_experts (ragged_dot computes every group on CPU)
    "matmul": "xla",         # jnp.dot
}
# The experts split over the 'expert' mesh axis run expert-sorted rows through grouped matmuls.
EXPERT_PARALLEL_MOE = ("xla", "pallas", "tokamax")

_FIELDS = {"attention": "attention_impl", "decode": "decode_impl", "moe": "moe_impl", "matmul": "matmul_impl"}
_GPU_NAMES = ("gpu", "cuda", "rocm")
_logged: set = set()


@dataclasses.dataclass(frozen=True)
class Impls:
  """Concrete implementation choices (see `ModelConfig`'s fields of the same names + '_impl')."""
  attention: str
  decode: str
  moe: str
  matmul: str
  interpret: bool
  backend: str
  dtype: str
  devices: int
  expert_parallel: int = 1

  def describe(self) -> str:
    """One line: what was chosen, and for what."""
    where = f"backend {self.backend}, {self.dtype}, {self.devices} device{'s' * (self.devices != 1)}"
    if self.expert_parallel > 1:
      where += f", {self.expert_parallel}-way expert parallel"
    return (f"impls: attention={self.attention} decode={self.decode} moe={self.moe} matmul={self.matmul} "
            f"interpret={self.interpret} ({where})")

  def apply(self, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with these choices in its implementation fields."""
    return cfg.replace(attention_impl=self.attention, decode_impl=self.decode, moe_impl=self.moe,
                       matmul_impl=self.matmul, pallas_interpret=self.interpret)


def _mesh_sizes(mesh) -> tuple[int, int]:
  """(devices, size of the 'expert' axis) of `mesh`, or of the ambient mesh (`jax.set_mesh`) when None."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or not mesh.axis_names:
      return 1, 1
  shape = dict(mesh.shape)
  return int(math.prod(shape.values())), int(shape.get("expert", 1))


def _backend_name(backend: Optional[str]) -> str:
  # Default: the backend the kernels are built for (JAX's default, or an enclosing
  # `kernels._common.target_backend`, as when lowering for CUDA on a CPU machine).
  name = (backend or _common.backend()).lower()
  return "gpu" if name in _GPU_NAMES else name


def resolve(cfg: ModelConfig, *, backend: Optional[str] = None, mesh=None,
            dtype: Optional[str] = None) -> Impls:
  """The concrete choices for `cfg` on `backend` (default: JAX's default backend; 'cuda' / 'rocm' mean a GPU),
  under `mesh` (default: the ambient mesh, else one device) with activations of `dtype` (default cfg.dtype).

  Raises:
    ValueError: a choice that cannot run there, naming the field and value.
  """
  devices, ep = _mesh_sizes(mesh)
  key = (cfg, _backend_name(backend), devices, ep, str(dtype or cfg.dtype))
  impls = _resolve(*key)
  host = [op for op in _FIELDS if getattr(impls, op) == "host"]
  if host:
    from kernels import host_build  # pylint: disable=g-import-not-at-top
    reason = host_build.unavailable_reason()
    if reason is not None:
      raise ValueError(f"ModelConfig.{_FIELDS[host[0]]}='host' needs the host kernels, which are unavailable "
                       f"here: {reason}")
  if key not in _logged and (any(getattr(cfg, f) == "auto" for f in _FIELDS.values())
                             or cfg.pallas_interpret is None):
    _logged.add(key)
    _log.info(impls.describe())
  return impls


@functools.lru_cache(maxsize=64)
def _resolve(cfg: ModelConfig, backend: str, devices: int, ep: int, dtype: str) -> Impls:
  table = GPU if backend == "gpu" else XLA
  chosen = {op: getattr(cfg, field) for op, field in _FIELDS.items()}
  if chosen["decode"] == "auto" and chosen["attention"] in ("xla", "pallas"):
    chosen["decode"] = chosen["attention"]     # an explicit attention choice carries to decoding
  if chosen["moe"] == "auto" and ep > 1:
    chosen["moe"] = table["moe"] if table["moe"] in EXPERT_PARALLEL_MOE else "xla"
  chosen = {op: table[op] if v == "auto" else v for op, v in chosen.items()}
  interpret = backend == "cpu" if cfg.pallas_interpret is None else cfg.pallas_interpret

  def bad(op, why):
    return ValueError(f"ModelConfig.{_FIELDS[op]}={chosen[op]!r} {why}")

  host = [op for op, v in chosen.items() if v == "host"]
  for op in host:
    if backend != "cpu" or dtype != "float32" or devices != 1:
      raise bad(op, f"needs float32 on one CPU device; got {dtype} on {devices} {backend} device(s)")
    if op == "moe" and cfg.precision == "fp8":
      raise bad(op, "runs float32 GEMMs; precision='fp8' needs 'blocked', 'dense', 'xla' or 'pallas'")
  if chosen["moe"] == "tokamax":
    if cfg.precision == "fp8":
      raise bad("moe", "runs tokamax's ragged_dot in the compute dtype; precision='fp8' needs 'blocked', "
                       "'dense', 'xla' or 'pallas'")
    from deepseek_jax.ops import tokamax_ragged_dot  # pylint: disable=g-import-not-at-top
    if not tokamax_ragged_dot.available():
      raise bad("moe", "needs the tokamax package (pip install tokamax), which is not installed")
  if ep > 1 and chosen["moe"] not in EXPERT_PARALLEL_MOE:
    raise bad("moe", f"runs one device's experts; with the experts split over the 'expert' mesh axis ({ep}) "
                     f"use one of {EXPERT_PARALLEL_MOE}")
  for op, v in chosen.items():
    if v == "pallas":
      if backend not in ("gpu", "cpu"):
        raise bad(op, f"needs a GPU (or CPU interpret mode); got backend {backend}")
      if backend == "cpu" and not interpret:
        raise bad(op, "runs on CPU only in interpret mode; got ModelConfig.pallas_interpret=False")
  return Impls(attention=chosen["attention"], decode=chosen["decode"], moe=chosen["moe"],
               matmul=chosen["matmul"], interpret=bool(interpret), backend=backend, dtype=dtype,
               devices=devices, expert_parallel=ep)


def resolve_config(cfg: ModelConfig, *, backend: Optional[str] = None, mesh=None,
                   dtype: Optional[str] = None) -> ModelConfig:
  """`cfg` with every implementation field concrete (`resolve`); a concrete config comes back unchanged."""
  return resolve(cfg, backend=backend, mesh=mesh, dtype=dtype).apply(cfg)
