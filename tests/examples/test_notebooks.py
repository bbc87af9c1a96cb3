"""The notebooks under examples/notebooks/ execute top to bottom in a fresh python3 kernel.

Each notebook states its claims as ``assert`` cells (a block against its formula, the loss
falling, a checkpoint reproducing its run's scores), so a broken block fails the run here.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "examples" / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; the whole tour takes under a minute on 2 CPU cores
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the kernel colours its tracebacks


def test_the_tour_is_collected():
    assert NOTEBOOKS / "tour.ipynb" in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_committed_notebook_has_no_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name}: no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {i} was committed with outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {i} was committed with an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_executes_without_errors(path: Path, monkeypatch):
    # The kernel (and any run it starts) inherits the environment: one thread each on a shared CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    tic = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:  # the failing cell's source and traceback
        pytest.fail(f"{path.name} failed after {time.perf_counter() - tic:.1f} s:\n{ANSI.sub('', str(error))}")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "not every cell ran, in order"
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    if path.name == "tour.ipynb":
        assert any("image/png" in out.get("data", {}) for out in outputs), "no inline plot"
        text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
        assert "FiLM and GRN match their formulas" in text
        assert "held-out MSE" in text and "hierarchy_mse" in text
