"""The notebooks: stored without outputs, and each one runs headless, start to finish, on the embedded sample.

Every notebook is executed with nbclient in a fresh kernel (this interpreter) and an empty temporary working
folder; any cell error fails the test with the cell's traceback. The sample catalog is generated once, before
the first notebook, into the usual cache (``$NDVI_SCALE_CACHE``, else ``~/.cache/ndvi-scale``), so no cell
waits for it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

try:
    import nbclient
    import nbclient.exceptions
    import nbformat
except ImportError:  # reported by the _need_nbclient fixture: fail with the fix, never skip
    nbclient = nbformat = None  # type: ignore[assignment]

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_search_and_inspect.ipynb",
    "02_ndvi_and_cloud_mask.ipynb",
    "03_monthly_composites_dask.ipynb",
    "04_open_zarr_compare_periods.ipynb",
    "05_parcels_ndvi_curves.ipynb",
]
#: Seconds any one cell may run (the slowest cell takes ~20 s on 2 cores).
CELL_TIMEOUT = 300
KERNEL_NAME = "ndvi-scale-tests"


@pytest.fixture(autouse=True)
def _need_nbclient():
    if nbclient is None or nbformat is None:
        pytest.fail(
            "nbclient/nbformat are not installed: pip install nbclient nbformat ipykernel", pytrace=False
        )


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    """What is committed holds sources only: no outputs, no execution counts, no widget state."""
    raw = json.loads(path.read_text())
    nb = nbformat.reads(path.read_text(), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata
    for i, cell in enumerate(raw["cells"]):
        where = f"{path.name} cell {i}"
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{where} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{where} has an execution count"
            assert "execution" not in cell.get("metadata", {}), f"{where} has execution timing metadata"
        assert "attachments" not in cell, f"{where} has attachments"
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            absolute = re.findall(r"[\"'](?:/|~/|[A-Za-z]:\\)[^\"']*[\"']", source)
            assert not absolute, f"{where} hard-codes paths {absolute}: use tempfile, the cache or an env var"


@pytest.fixture(scope="session")
def kernel_manager_factory(tmp_path_factory):
    """A kernelspec running this very interpreter (the notebooks must see the same installed packages)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "ndvi-scale tests",
                "language": "python",
            }
        )
    )

    def make() -> KernelManager:
        ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
        return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)

    return make


@pytest.fixture(scope="session")
def sample_ready():
    """Generate the embedded sample once (about a minute on a cold cache) before any notebook needs it."""
    from ndvi_scale.sample import sample_catalog

    return sample_catalog()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(path, tmp_path, monkeypatch, kernel_manager_factory, sample_ready):
    monkeypatch.delenv("NDVI_SCALE_ZARR", raising=False)  # notebook 04 writes its own cube
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence the debugger's frozen-modules note
    nb = nbformat.read(path, as_version=4)
    km = kernel_manager_factory()
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it did not create the manager of: stop it
            km.shutdown_kernel(now=True)
    elapsed = time.perf_counter() - start
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    # a stderr line with a traceback in it means something failed quietly (e.g. a dask worker)
    stderr = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stderr"
    )
    assert "Traceback" not in stderr, stderr[-3000:]
    print(f"{path.name}: {elapsed:.1f} s")
    assert list(tmp_path.iterdir()) == [] or all(p.name.startswith(".") for p in tmp_path.iterdir()), (
        f"{path.name} left files in its working folder: {sorted(p.name for p in tmp_path.iterdir())}"
    )
