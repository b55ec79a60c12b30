"""Executes every research notebook top to bottom and fails on the first cell error.

The notebooks are stored executed, so that a reader sees their plots without running them; the test clears
those outputs and runs each notebook again from its source, in memory (nothing is written back). Each runs in
a fresh IPython kernel of this very interpreter (a kernel spec written to a temporary directory, so nothing
depends on which kernels happen to be installed), on the CPU backend, from the notebooks/ directory. The
notebooks assert their own numbers (naive == absorbed MLA, kernels == references, parameter counts == the
report), so a cell error is a wrong result as well as a broken API. Each notebook's wall time is printed for
the record.
"""

import json
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

pytestmark = pytest.mark.slow  # about 5 minutes for all of them on 2 cores

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
KERNEL = "deepseek-jax-notebook-test"
CELL_TIMEOUT_S = 180
MAX_STORED_BYTES = 300_000   # a stored notebook: text outputs and modest PNG plots, nothing bulky


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
  """A KernelSpecManager that knows one kernel: `python -m ipykernel_launcher` of sys.executable, CPU jax."""
  root = tmp_path_factory.mktemp("kernels")
  spec_dir = root / KERNEL
  spec_dir.mkdir()
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "deepseek-jax (test)",
      "language": "python",
      # JAX_PLATFORMS: never probe for accelerators; MPLBACKEND: inline figures without a display.
      "env": {"JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
              "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return KernelSpecManager(kernel_dirs=[str(root)], ensure_native_kernel=False)


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


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, kernel_specs, capsys):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:   # run from the source, not the stored outputs
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  km = jupyter_client.KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                   allow_errors=False, resources={"metadata": {"path": str(NOTEBOOKS)}})
  t0 = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
  finally:
    if km.has_kernel:   # nbclient leaves a kernel manager it was given running
      km.shutdown_kernel(now=True)
  wall = time.perf_counter() - t0
  with capsys.disabled():
    print(f"\n[notebook] {path.name}: {wall:.1f} s", flush=True)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
