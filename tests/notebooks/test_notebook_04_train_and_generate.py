"""Notebook 04 (train a tiny model, then generate) runs from its source without a cell error."""

import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
  run_notebook("04_train_and_generate.ipynb")
