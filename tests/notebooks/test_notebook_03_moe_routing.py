"""Notebook 03 (MoE routing) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("03_moe_routing.ipynb")
