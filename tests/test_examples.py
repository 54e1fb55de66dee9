"""The example notebooks run end to end (small sizes, on whatever device JAX has)."""

import os
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _run(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


@pytest.mark.parametrize("name", ["graph_challenge.ipynb"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("SPDNN_NB_LAYERS", "12")
    monkeypatch.setenv("SPDNN_NB_BATCH", "2000")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    outputs = _run(name)
    assert "PASSED" in outputs and "True" in outputs
    assert "same survivors as SparseDNN: True" in " ".join(outputs.split())  # streamed
    assert os.environ.get("SPDNN_NB_LAYERS") == "12"


def test_pruned_cnn_notebook(monkeypatch):
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPDNN_NB_EPOCHS", "6")
    monkeypatch.setenv("SPDNN_NB_TIMING_BATCH", "64")
    outputs = _run("pruned_cnn.ipynb")
    assert "same predictions: True" in outputs
    acc = [float(a) for a in re.findall(r"fine-tuned: ([0-9.]+)", outputs)]
    assert acc and acc[0] > 0.5, outputs


def test_sharded_inference_notebook(monkeypatch):
    monkeypatch.setenv("SPDNN_NB_LAYERS", "12")
    monkeypatch.setenv("SPDNN_NB_BATCH", "2000")
    outputs = _run("sharded_inference.ipynb")
    assert "identical categories: True" in outputs
    assert "all-gather in the compiled program: False" in outputs
    assert "identical with rebalancing: True" in outputs
    assert "gradients equal single-device: True" in outputs
