"""The notebooks as stored: executed top to bottom without an error, PNG plots only, modest in size; and each
has a test file here that runs it."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
MAX_STORED_BYTES = 300_000   # a stored notebook: text outputs and modest PNG plots, nothing bulky


def test_notebooks_exist():
  names = [p.name for p in PATHS]
  assert names == ["01_architecture_tour.ipynb", "02_mla.ipynb", "03_moe_routing.ipynb",
                   "04_train_and_generate.ipynb", "05_cost_of_deepseek_v3.ipynb", "06_kernels.ipynb",
                   "07_grpo.ipynb"]
  for p in PATHS:
    assert p.stat().st_size <= MAX_STORED_BYTES, f"{p.name}: {p.stat().st_size} bytes stored"
    nb = nbformat.read(p, as_version=4)
    assert "widgets" not in nb.metadata, f"{p.name} stores widget state"
    # Stored executed in one pass: every code cell ran, in order, without an error.
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{p.name} is not stored executed top to bottom")
    for cell in code:
      for out in cell.outputs:
        assert out.output_type != "error", f"{p.name} stores an error"
        # Plots as PNG only (no SVG, HTML or widget views).
        assert set(out.get("data", {})) <= {"text/plain", "image/png"}, (p.name, sorted(out.get("data", {})))


def test_every_notebook_has_a_test_that_runs_it():
  here = pathlib.Path(__file__).parent
  for p in PATHS:
    number = p.name.split("_", 1)[0]
    files = list(here.glob(f"test_notebook_{number}_*.py"))
    assert len(files) == 1 and f'"{p.name}"' in files[0].read_text(), (p.name, files)
