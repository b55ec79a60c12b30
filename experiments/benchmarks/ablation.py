"""Wall-clock ablations of the train step: one part of the model's work swapped for a stand-in.

On CPU the profile cannot say exactly what a part costs: XLA:CPU runs independent ops side by side and
Eigen's dots asynchronously, so op times overlap and include waits for the intra-op pool. What a part
costs the step is what the step saves without it. `without(part)` swaps one part for a stand-in of
negligible work while a step is traced; `--suite=train --ablate=routed_experts,attention` (or 'all': also
the shared experts and the dense layers' MLP) times those steps
interleaved with the full one and reports each part's cost (full - without) and share of the step.

The stand-ins keep every parameter and the cotangent path to everything upstream (a scalar of each input
mixed into the output), so the projections, the router, the optimizer and the rest still do their work;
the numbers they produce are meaningless.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.layers import mla, moe, transformer
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.mlp import MLP


def _routed_experts(x, idx, weights, w_gate, w_up, w_down, **_):
  """Each token times the sum of its gate weights (so the router still gets a gradient)."""
  del idx, w_gate, w_up, w_down
  return x * jnp.sum(weights, axis=-1, keepdims=True).astype(x.dtype)


def _attention(q_nope, q_pe, k_nope, k_pe, v, **_):
  """v scaled by 1 + the mean of the queries and keys (so their projections still get a gradient)."""
  mix = sum(jnp.mean(a.astype(jnp.float32)) for a in (q_nope, q_pe, k_nope, k_pe))
  return (v * (1.0 + 1e-3 * mix)).astype(q_nope.dtype)


class _MLP(MLP):
  """The SwiGLU MLP's parameters (same names and shapes), used only as x scaled by their means."""

  @nn.compact
  def __call__(self, x):
    d, f = self.cfg.hidden_size, self.hidden
    kernels = [Linear(self.cfg, i, o, a, name=n).kernel() for n, i, o, a in (
        ("gate_proj", (d,), (f,), ("embed", self.axis)), ("up_proj", (d,), (f,), ("embed", self.axis)),
        ("down_proj", (f,), (d,), (self.axis, "embed")))]
    mix = sum(jnp.mean(k.astype(jnp.float32)) for k in kernels)
    return (x * (1.0 + mix)).astype(x.dtype)


# part -> (module, attribute the model calls at trace time, stand-in)
PARTS = {
    "routed_experts": (moe, "routed_experts", _routed_experts),
    "attention": (mla, "mla_attention", _attention),
    "shared_experts": (moe, "MLP", _MLP),
    "dense_mlp": (transformer, "MLP", _MLP),
}


@contextlib.contextmanager
def without(part: str):
  """Within the block, steps traced (built and first called) run `part` as its stand-in (see `PARTS`).

  Raises:
    ValueError: an unknown part.
  """
  if part not in PARTS:
    raise ValueError(f"unknown part {part!r} to ablate; expected one of {sorted(PARTS)}")
  module, name, stand_in = PARTS[part]
  saved = getattr(module, name)
  setattr(module, name, stand_in)
  try:
    yield
  finally:
    setattr(module, name, saved)


def parts(spec: str) -> list[str]:
  """The parts named in a comma-separated `--ablate` value ('all': every part), checked."""
  names = sorted(PARTS) if spec.strip() == "all" else [p.strip() for p in spec.split(",") if p.strip()]
  for p in names:
    if p not in PARTS:
      raise ValueError(f"--ablate: unknown part {p!r}; expected 'all' or some of {sorted(PARTS)}")
  return names
