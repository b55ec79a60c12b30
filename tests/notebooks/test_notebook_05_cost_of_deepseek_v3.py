"""Notebook 05 (the cost of DeepSeek-V3) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("05_cost_of_deepseek_v3.ipynb")
