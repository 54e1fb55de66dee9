"""benchmarks/staging_model.py: the staging traffic quoted in RESULTS.md, checked on layers
whose counts are known by hand."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import staging_model as sm  # noqa: E402

from jax_spdnn import SparseMatrix  # noqa: E402
from jax_spdnn.challenge import radixnet_layer  # noqa: E402


def test_one_group_uses_every_input():
    m = sm.model(radixnet_layer(1024, 1))  # 1024 outputs: one group, every input used
    assert m == {
        "full": 4 * 1024,
        "footprint": 32 * 1024 // 8,
        "footprint, reordered": 32 * 1024 // 8,
        "reordered, interleaved": 4 * 1024,
        "kernel": m["kernel"],
        "floor": 8 * 1024,
    }
    # the kernel's 4 groups of 256 outputs: every input staged at least once, at most 4 times
    assert 4 * 1024 <= m["kernel"] <= 4 * 4 * 1024


def test_reordering_groups_equal_input_sets():
    """2048 outputs in two halves that each read 64 inputs, interleaved: in natural order
    each group of 1024 touches all 128 inputs, reordered each touches 64."""
    n_out = 2048
    rows = np.repeat(np.arange(n_out), 64)
    cols = (np.tile(np.arange(64), n_out) * 2 + rows % 2).astype(np.int64)  # even or odd
    W = SparseMatrix.from_triplets(cols, rows, np.ones(rows.size), (128, n_out))
    m = sm.model(W)
    assert m["full"] == 2 * 4 * 128
    assert m["footprint"] == 2 * 32 * 16  # 128 columns: 16 sectors, both groups
    assert m["reordered, interleaved"] == 2 * 4 * 64
    assert m["footprint, reordered"] == 2 * 32 * 16  # even/odd columns share every sector
    assert m["kernel"] == 8 * 4 * 64  # the kernel's 8 groups of 256 read 64 inputs each
    order = sm.reorder(sm.input_sets(W))
    assert set(order[:1024] % 2) == {0} and set(order[1024:] % 2) == {1}
