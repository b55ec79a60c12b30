"""Notebook 06 (the kernels against their references) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("06_kernels.ipynb")
