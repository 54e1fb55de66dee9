"""Official file formats: round trips, the official N=1024 layers, and errors that name
the file and the line."""

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sps

from jax_spdnn.challenge import (
    radixnet,
    random_inputs,
    read_categories,
    read_images,
    read_layer,
    read_layers,
    write_categories,
    write_images,
    write_layers,
)

DATA = Path(__file__).parent / "data"


def test_layer_round_trip(tmp_path):
    layers = radixnet(64, 3, seed=2)
    d = write_layers(tmp_path / "neuron64", layers)
    assert sorted(p.name for p in d.iterdir()) == ["n64-l1.tsv", "n64-l2.tsv", "n64-l3.tsv"]
    back = read_layers(d, 64, 3)
    for a, b in zip(layers, back):
        assert a.structure == b.structure
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    # a tar.gz with the layers in a sub-folder, as the official archives are
    tgz = tmp_path / "neuron64.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(d, arcname="n64")
    for a, b in zip(layers, read_layers(tgz, 64, 3)):
        assert a.structure == b.structure


def test_official_layers_load():
    with gzip.open(DATA / "n1024-l1.tsv.gz", "rb") as f:
        raw = f.read()
    p = Path(DATA / "n1024-l1.tsv")
    try:
        p.write_bytes(raw)
        W = read_layer(p, 1024)
    finally:
        p.unlink()
    assert W.shape == (1024, 1024) and W.nnz == 32768
    assert np.all(np.asarray(W.values) == np.float32(1 / 16))
    assert np.all(np.diff(W.indptr) == 32)


def test_images_and_categories_round_trip(tmp_path):
    x = random_inputs(64, 20, seed=1)
    x[3] = 0  # an all-zero image
    write_images(tmp_path / "sparse-images-64.tsv", x)
    back = read_images(tmp_path / "sparse-images-64.tsv", 64, n_images=20)
    assert isinstance(back, sps.csr_matrix)
    np.testing.assert_array_equal(back.toarray(), x)
    write_categories(tmp_path / "cats.tsv", [5, 0, 17])
    assert (tmp_path / "cats.tsv").read_text().split() == ["1", "6", "18"]
    np.testing.assert_array_equal(read_categories(tmp_path / "cats.tsv"), [0, 5, 17])
    official = read_categories(DATA / "neuron1024-l120-categories.tsv")
    assert official.size == 1812 and official[0] == 286


def test_malformed_files(tmp_path):
    bad = tmp_path / "n8-l1.tsv"
    bad.write_text("1\t1\t0.5\n2\t9\t0.5\n")
    with pytest.raises(ValueError, match=r"n8-l1.tsv: line 2: second index 9 out of range 1..8"):
        read_layer(bad, 8)
    bad.write_text("1\t1\t0.5\n2\t3\n")
    with pytest.raises(ValueError, match=r"n8-l1.tsv: malformed layer file.*2"):
        read_layer(bad, 8)
    bad.write_text("1\t1\t0.5\n0\t3\t1\n")
    with pytest.raises(ValueError, match=r"line 2: first index 0 out of range"):
        read_layer(bad, 8)
    bad.write_text("1\t1\tnan\n")
    with pytest.raises(ValueError, match=r"line 1: value is not finite"):
        read_layer(bad, 8)
    bad.write_text("1\t1\t0.5\n1\t1\t0.5\n")
    with pytest.raises(ValueError, match="duplicate entry"):
        read_layer(bad, 8)
    (tmp_path / "net").mkdir()
    write_layers(tmp_path / "net", radixnet(32, 2))
    with pytest.raises(FileNotFoundError, match=r"missing layer file n32-l3.tsv"):
        read_layers(tmp_path / "net", 32, 3)
    cats = tmp_path / "c.tsv"
    cats.write_text("3\nx\n")
    with pytest.raises(ValueError, match=r"c.tsv: line 2: expected an image index"):
        read_categories(cats)
    with pytest.raises(FileNotFoundError, match="no layer directory or archive"):
        read_layers(tmp_path / "nowhere", 32, 1)


def test_empty_layer_file(tmp_path):
    p = tmp_path / "n8-l1.tsv"
    p.write_text("")
    assert read_layer(p, 8).nnz == 0
