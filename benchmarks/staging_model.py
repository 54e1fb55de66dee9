"""Shared-memory staging traffic of the layer kernel, counted from the sparsity pattern.

The CUDA layer kernel gives a block a tile of 8 feature rows and a group of 1024 output
neurons, and stages the tile's input columns through shared memory. This model counts, per
feature row and layer, the bytes that staging pulls from L2 under four designs:

- ``full``: every input column, 4 bytes each (the layer kernel), ``n / 1024`` times per row;
- ``footprint``: only the columns the group's outputs use (its footprint), gathered from
  row-major features: one 32-byte sector per distinct ``column // 8`` per row;
- ``footprint, reordered``: the same after a generic reordering of the output neurons by their
  input sets (lexicographic), so that outputs sharing inputs share a group;
- ``reordered, interleaved``: footprints of the reordered groups with features stored 8 rows
  per 32-byte sector (the seed's layout), 4 bytes per footprint column and row.
- ``kernel``: what the footprint kernel stages: footprints of its own groups
  (``FOOTPRINT_GROUP`` outputs in ``footprint_order``), 4 bytes per column and row (its
  32-row tiles make every staged column one 128-byte line).

The last design is what the footprint kernel does (``jax_spdnn.sparse.pack_footprint``; it
uses groups of 256 outputs and 32-row tiles, measured best on H100). It needs no GPU: it
reads the pattern only.  The floor counts 8 bytes per row and neuron
(its features read and written once).

    python benchmarks/staging_model.py [--neurons 1024 4096 16384 65536] [--layers 1 13]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jax_spdnn import challenge as ch  # noqa: E402
from jax_spdnn.sparse import FOOTPRINT_GROUP, pack_footprint  # noqa: E402

GROUP = 1024  # outputs per block (256 threads x 4 outputs)


def input_sets(W) -> list[np.ndarray]:
    """Each output neuron's sorted inputs (CSR of W^T)."""
    s = W.structure
    return np.split(s.indices.astype(np.int64), s.indptr[1:-1])


def reorder(sets) -> np.ndarray:
    """Output neurons sorted by their input sets (lexicographic; padded with -1)."""
    width = max((len(v) for v in sets), default=0)
    keys = np.full((len(sets), width), -1, np.int64)
    for j, v in enumerate(sets):
        keys[j, : len(v)] = v
    return np.lexsort(keys.T[::-1]) if width else np.arange(len(sets))


def staging_bytes(sets, order, n_in: int) -> dict:
    """Bytes staged per feature row and layer under each design, for one output order."""
    full = footprint = interleaved = 0
    for g in range(0, len(order), GROUP):
        members = [sets[j] for j in order[g : g + GROUP]]
        cols = np.unique(np.concatenate(members)) if members else np.zeros(0, np.int64)
        full += 4 * n_in
        footprint += 32 * np.unique(cols // 8).size
        interleaved += 4 * cols.size
    return {"full": full, "footprint": footprint, "interleaved": interleaved}


def model(W) -> dict:
    sets = input_sets(W)
    natural = staging_bytes(sets, np.arange(len(sets)), W.n_in)
    reordered = staging_bytes(sets, reorder(sets), W.n_in)
    return {
        "full": natural["full"],
        "footprint": natural["footprint"],
        "footprint, reordered": reordered["footprint"],
        "reordered, interleaved": reordered["interleaved"],
        "kernel": 4 * pack_footprint(W.structure, FOOTPRINT_GROUP).staged,
        "floor": 8 * W.n_out,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neurons", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[1, 13],
        help="1-based layers of the generated network (layer 1: the unpermuted first block; "
        "a layer past log2(N/16) uses a random permutation)",
    )
    p.add_argument("--random", action="store_true", help="also a random 32-per-output layer")
    a = p.parse_args(argv)
    names = ["full", "footprint", "footprint, reordered", "reordered, interleaved", "kernel"]
    names.append("floor")
    print("| layer | " + " | ".join(names) + " | full / best |")
    print("|---|" + "---|" * (len(names) + 1))
    cases = [(f"{n}-l{k}", ch.radixnet_layer(n, k, seed=0)) for n in a.neurons for k in a.layers]
    if a.random:
        from jax_spdnn import SparseMatrix

        rng = np.random.default_rng(0)
        for n in a.neurons:
            rows = np.repeat(np.arange(n), 32)
            cols = np.concatenate([rng.choice(n, 32, replace=False) for _ in range(n)])
            W = SparseMatrix.from_triplets(cols, rows, np.ones(n * 32), (n, n))
            cases.append((f"{n} random", W))
    for name, W in cases:
        m = model(W)
        best = min(m[k] for k in names[:-1])
        cells = " | ".join(f"{m[k] / 1e6:.3f} MB" for k in names)
        print(f"| {name} | {cells} | {m['full'] / best:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
