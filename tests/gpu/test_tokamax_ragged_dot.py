"""deepseek_jax.ops.tokamax_ragged_dot against the gmm reference, values and gradients (where tokamax is
installed, e.g. the jax 0.11 CUDA compile environment; on CPU tokamax runs its XLA implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops import tokamax_ragged_dot as trd
from kernels import grouped_matmul as gm

pytestmark = pytest.mark.skipif(not trd.available(), reason="tokamax is not installed")


def test_matches_gmm_reference():
  sizes = jnp.asarray([0, 7, 13, 0, 25], jnp.int32)
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (50, 24), jnp.float32)
  w = jax.random.normal(ks[1], (5, 24, 40), jnp.float32)
  dy = jax.random.normal(ks[2], (50, 40), jnp.float32)
  got, pull = jax.vjp(lambda a, b: trd.ragged_dot(a, b, sizes), x, w)
  want, want_pull = jax.vjp(lambda a, b: gm.gmm_reference(a, b, sizes), x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, wv in zip(pull(dy), want_pull(dy)):
    np.testing.assert_allclose(g, wv, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got[45:]).max()) == 0.0
