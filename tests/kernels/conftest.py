"""Shared checking helper for the kernel tests.

On CPU the kernels run in interpret mode; on a GPU the same tests compile them through Triton
(`interpret=None` in every call). Errors are printed (`pytest -s`) as max abs error and max abs
error relative to max |expected|.
"""

import numpy as np
import pytest


def _assert_close(name, got, want, tol):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = float(np.max(np.abs(got - want))) if got.size else 0.0
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  rel = err / max(scale, 1e-30)
  print(f"[err] {name}: max_abs={err:.3e} rel={rel:.3e}")
  assert rel <= tol, f"{name}: max abs err {err:.3e} = {rel:.3e} of max |want| {scale:.3e} > {tol}"


@pytest.fixture
def assert_close():
  return _assert_close
