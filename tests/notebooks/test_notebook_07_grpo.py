"""Notebook 07 (GRPO with and without routing replay) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("07_grpo.ipynb")
