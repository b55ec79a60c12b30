"""Runs a research notebook top to bottom and fails on the first cell error.

The notebooks are stored executed, so that a reader sees their plots without running them; a test clears
those outputs and runs its notebook again from the source, in memory (nothing is written back). Each runs in
a fresh IPython kernel of this very interpreter (a kernel spec written to a temporary directory, so nothing
depends on which kernels happen to be installed), on the CPU backend, from the notebooks/ directory. The
notebooks assert their own numbers (naive == absorbed MLA, kernels == references, parameter counts == the
report), so a cell error is a wrong result as well as a broken API. Each notebook's wall time is printed for
the record. One test file per notebook, so that the suite's workers share them.
"""

import json
import pathlib
import sys
import time

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent.parent / "notebooks"
KERNEL = "deepseek-jax-notebook-test"
CELL_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory):
  """A KernelSpecManager that knows one kernel: `python -m ipykernel_launcher` of sys.executable, CPU jax."""
  KernelSpecManager = pytest.importorskip("jupyter_client.kernelspec").KernelSpecManager
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


@pytest.fixture
def run_notebook(kernel_specs, capsys):
  """run_notebook(name): executes notebooks/<name> from its source; fails naming the cell that raised."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  jupyter_client = pytest.importorskip("jupyter_client")
  pytest.importorskip("ipykernel")

  def run(name: str):
    path = NOTEBOOKS / name
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
      pytest.fail(f"{name}: a cell raised\n{e}", pytrace=False)
    finally:
      if km.has_kernel:   # nbclient leaves a kernel manager it was given running
        km.shutdown_kernel(now=True)
    wall = time.perf_counter() - t0
    with capsys.disabled():
      print(f"\n[notebook] {name}: {wall:.1f} s", flush=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors

  return run
