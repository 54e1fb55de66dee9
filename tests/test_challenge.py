"""Generated Graph Challenge networks: the RadiX-Net recipe reproduces the official
N=1024 layers of the first (unpermuted) block exactly and the degree structure of
every block; the demo command runs end to end."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_spdnn.challenge import (
    challenge_bias,
    digit_inputs,
    radixnet,
    radixnet_layer,
    random_inputs,
)

DATA = Path(__file__).parent / "data"


def _official_layer(k):
    """1-based (i, j) pairs of an official N=1024 layer stored in tests/data."""
    with gzip.open(DATA / f"n1024-l{k}.tsv.gz", "rt") as f:
        a = np.loadtxt(f)
    return a


@pytest.mark.parametrize("k", [1, 2, 6])
def test_first_block_matches_official(k):
    a = _official_layer(k)
    W = radixnet_layer(1024, k).to_scipy().tocoo()
    official = set(zip(a[:, 0].astype(int) - 1, a[:, 1].astype(int) - 1))
    assert set(zip(W.row.tolist(), W.col.tolist())) == official
    assert np.all(a[:, 2] == 1 / 16) and np.all(W.data == np.float32(1 / 16))


def test_permuted_block_degree_structure():
    """Official layer 7 (block 1) and a generated one: 32 per row and column,
    outputs depend only on j mod 64, and the two residues differ by 2^(k-1)."""
    a = _official_layer(7)
    for rows, cols in (
        (a[:, 0].astype(int) - 1, a[:, 1].astype(int) - 1),
        tuple(np.asarray(v) for v in _coo(radixnet_layer(1024, 7, seed=3))),
    ):
        assert np.all(np.bincount(rows, minlength=1024) == 32)
        assert np.all(np.bincount(cols, minlength=1024) == 32)
        by_row = {}
        for r, j in zip(rows, cols):
            by_row.setdefault(r, set()).add(j % 64)
        assert all(len(s) == 2 for s in by_row.values())
        assert all((max(s) - min(s)) in (1, 63) for s in by_row.values())  # k = 1


def _coo(W):
    c = W.to_scipy().tocoo()
    return c.row, c.col


def test_generator_properties():
    layers = radixnet(64, 5, seed=1)
    assert len(layers) == 5 and all(W.shape == (64, 64) and W.nnz == 64 * 32 for W in layers)
    assert radixnet_layer(64, 3, seed=1).structure != radixnet_layer(64, 3, seed=2).structure
    assert radixnet_layer(64, 3, seed=1).structure == layers[2].structure
    with pytest.raises(ValueError, match="16 \\* 2\\^k"):
        radixnet_layer(1000, 1)
    with pytest.raises(ValueError, match="numbered from 1"):
        radixnet_layer(64, 0)
    assert challenge_bias(65536) == -0.45
    with pytest.raises(ValueError, match="no official bias"):
        challenge_bias(2048)
    x = random_inputs(256, 50, density=0.25, seed=0)
    assert x.shape == (50, 256) and set(np.unique(x)) <= {0.0, 1.0}
    assert 0.2 < x.mean() < 0.3


def test_digit_inputs():
    x = digit_inputs(256, 500, seed=1)
    assert x.shape == (500, 256) and x.dtype == np.float32
    per_row = np.diff(x.indptr)
    assert 0.05 * 256 < per_row.mean() < 0.11 * 256 and per_row.min() >= 1
    assert np.all(x.data == 1.0)
    again = digit_inputs(256, 500, seed=1)
    assert (x != again).nnz == 0
    assert (x != digit_inputs(256, 500, seed=2)).nnz > 0
    with pytest.raises(ValueError, match="square number"):
        digit_inputs(512, 10)


def test_digit_inputs_do_not_depend_on_threads(monkeypatch):
    """Chunks are finished by worker threads from one sequence of random draws: the images
    are the same for any thread count (many small chunks, so several are in flight)."""
    import os

    many = digit_inputs(256, 301, seed=4, chunk=17)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    one = digit_inputs(256, 301, seed=4, chunk=17)
    assert (many != one).nnz == 0 and many.nnz > 0
    assert np.array_equal(np.diff(many.indptr), np.diff(one.indptr))


def _run_cli(*args):
    """Runs ``python -m jax_spdnn *args`` and returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "jax_spdnn", *args], capture_output=True, text=True, timeout=300
    )


def test_challenge_command(tmp_path):
    plot = tmp_path / "active.png"
    out = _run_cli(
        "--neurons", "256", "--layers", "8", "--batch", "300", "--profile", "--plot", str(plot)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TE/s" in out.stdout and "of 300 images have a nonzero final row" in out.stdout
    assert "PASSED" in out.stdout and plot.stat().st_size > 0
    flat = " ".join(out.stdout.split())  # rich wraps lines at the terminal width
    assert "sum of per-layer times" in flat and "for the fused network" in flat


def test_challenge_command_streamed():
    out = _run_cli("--neurons", "1024", "--layers", "12", "--batch", "500", "--chunk-layers", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    flat = " ".join(out.stdout.split())
    assert "streamed in chunks of 5 layers" in flat and "PASSED" in flat
    bad = _run_cli("--layers", "4", "--chunk-layers", "2", "--profile")
    assert bad.returncode == 2 and "does not combine" in bad.stderr


def test_challenge_command_official_layout(tmp_path):
    """--data with the official file names: layers, images and a truth file."""
    from jax_spdnn.challenge import (
        reference_inference,
        write_categories,
        write_images,
        write_layers,
    )

    layers = radixnet(64, 4, seed=9)
    write_layers(tmp_path / "neuron64", layers)
    x = digit_inputs(64, 200, seed=3, fill=0.2)
    write_images(tmp_path / "sparse-images-64.tsv", x)
    ref = reference_inference(layers, -0.3, x)
    write_categories(tmp_path / "neuron64-l4-categories.tsv", ref.categories)
    out = _run_cli(
        "challenge", "--neurons", "64", "--layers", "4", "--batch", "200", "--data", str(tmp_path)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "official neuron64-l4-categories.tsv" in out.stdout and "PASSED" in out.stdout


def test_official_layers_run_through_sparse_dnn(device, tmp_path):
    """The official layers kept in tests/data, read with the official reader and run as a
    network, match the float64 reference on every unambiguous image."""
    import jax_spdnn as sd
    from jax_spdnn.challenge import check_categories, read_layers, reference_inference

    net_dir = tmp_path / "neuron1024"
    net_dir.mkdir()
    for new_k, k in enumerate((1, 2, 6, 7), start=1):
        with gzip.open(DATA / f"n1024-l{k}.tsv.gz", "rb") as f:
            (net_dir / f"n1024-l{new_k}.tsv").write_bytes(f.read())
    layers = read_layers(net_dir, 1024, 4)
    x = digit_inputs(1024, 3000, seed=5)
    ref = reference_inference(layers, -0.3, x)
    got = sd.SparseDNN(layers, -0.3)(x.toarray())
    check = check_categories(got.categories(), ref.categories, ref.ambiguous)
    assert check.passed, check.summary()
    assert 0 < ref.categories.size < 3000
