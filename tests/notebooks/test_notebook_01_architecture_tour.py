"""Notebook 01 (the architecture tour) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("01_architecture_tour.ipynb")
