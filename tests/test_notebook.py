"""The notebook tour runs top to bottom (nbclient, a real kernel), and what git holds is the stripped build."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def build_module():
    spec = importlib.util.spec_from_file_location("build_tour", NOTEBOOKS / "build_tour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_the_build_without_outputs():
    committed = (NOTEBOOKS / "tour.ipynb").read_text()
    assert committed == build_module().text(), "run `python notebooks/build_tour.py` and commit tour.ipynb"
    for cell in json.loads(committed)["cells"]:
        assert cell["cell_type"] == "markdown" or (cell["outputs"] == [] and cell["execution_count"] is None)
        assert len(cell["source"]) <= 30, "a cell longer than a screen: split it"


@pytest.mark.slow
def test_tour_runs_top_to_bottom(tmp_path, monkeypatch, use_real_data):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum(output.get("output_type") == "display_data" for output in outputs) >= 8  # the figures
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    assert "test accuracy" in text and "same probabilities after reloading: True" in text
    assert (tmp_path / "runs" / "tour-cnn" / "model.safetensors").is_file()
