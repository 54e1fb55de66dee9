"""The example notebooks run end to end (small sizes, on whatever device JAX has)."""

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.parametrize("name", ["graph_challenge.ipynb"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("SPDNN_NB_LAYERS", "12")
    monkeypatch.setenv("SPDNN_NB_BATCH", "2000")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "PASSED" in outputs and "True" in outputs
    assert os.environ.get("SPDNN_NB_LAYERS") == "12"
