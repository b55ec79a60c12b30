"""Notebook 02 (MLA, naive and absorbed) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("02_mla.ipynb")
