"""The SwiGLU MLP of the dense layers and of the shared experts."""

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear


class MLP(nn.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x))."""
  cfg: ModelConfig
  hidden: int
  axis: str = "mlp"

  @nn.compact
  def __call__(self, x):
    d = self.cfg.hidden_size
    gate = Linear(self.cfg, (d,), (self.hidden,), ("embed", self.axis), name="gate_proj")(x)
    up = Linear(self.cfg, (d,), (self.hidden,), ("embed", self.axis), name="up_proj")(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("activation_batch", "activation_length",
                                                            "activation_mlp"))
    return Linear(self.cfg, (self.hidden,), (d,), (self.axis, "embed"), name="down_proj")(h)
