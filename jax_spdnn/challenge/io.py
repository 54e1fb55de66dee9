"""Official Sparse DNN Graph Challenge file formats (read and write).

All files are tab separated and 1-based:

- layer ``n{N}-l{k}.tsv``: lines ``i  j  value``, an edge from input neuron ``i`` to output
  neuron ``j`` (``W[i, j]``), in a directory or a ``neuron{N}.tar.gz`` archive;
- inputs ``sparse-images-{N}.tsv``: lines ``image  neuron  value``;
- truth ``neuron{N}-l{L}-categories.tsv``: one image index per line, ascending.

Parsing is vectorized (NumPy's C parser): the 120 official N=1024 layers load in seconds.
Malformed files raise ``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sps

from jax_spdnn.sparse import SparseMatrix

__all__ = [
    "LayerSource",
    "layer_filename",
    "read_categories",
    "read_images",
    "read_layer",
    "read_layers",
    "write_categories",
    "write_images",
    "write_layer",
    "write_layers",
]


def layer_filename(n: int, k: int) -> str:
    return f"n{n}-l{k}.tsv"


def _parse_triplets(data: bytes | str, name: str, shape: tuple[int, int], what: str):
    """Parses ``a  b  value`` lines into 0-based int64 rows/cols and float64 values."""
    if isinstance(data, str):
        data = data.encode()
    if not data.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    try:
        a = np.loadtxt(io.BytesIO(data), delimiter="\t", ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{name}: malformed {what} file: {e}") from None
    if a.shape[1] != 3:
        raise ValueError(f"{name}: line 1: expected 3 tab-separated columns, got {a.shape[1]}")
    rows, cols = a[:, 0], a[:, 1]
    for col, n, label in ((rows, shape[0], "first"), (cols, shape[1], "second")):
        bad = (col < 1) | (col > n) | (col != np.floor(col))
        if bad.any():
            line = int(np.argmax(bad)) + 1
            raise ValueError(
                f"{name}: line {line}: {label} index {col[line - 1]:g} out of range 1..{n}"
            )
    if not np.all(np.isfinite(a[:, 2])):
        line = int(np.argmax(~np.isfinite(a[:, 2]))) + 1
        raise ValueError(f"{name}: line {line}: value is not finite")
    return rows.astype(np.int64) - 1, cols.astype(np.int64) - 1, a[:, 2]


class LayerSource:
    """Layer files of one network, from a directory or a ``.tar.gz`` archive.

    Files are found by name (``n{N}-l{k}.tsv``) anywhere in the directory tree or archive.
    """

    def __init__(self, path: str | os.PathLike, n: int):
        self.path = Path(path)
        self.n = n
        self._members: dict[str, str] = {}
        self._tar: tarfile.TarFile | None = None
        self._cache: dict[str, bytes] = {}
        pattern = re.compile(rf"(?:^|/)(n{n}-l\d+\.tsv)$")
        if self.path.is_dir():
            for p in self.path.rglob(f"n{n}-l*.tsv"):
                self._members[p.name] = str(p)
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self._tar = tarfile.open(self.path, "r:*")
            for m in self._tar.getmembers():
                match = pattern.search(m.name)
                if match and m.isfile():
                    self._members[match.group(1)] = m.name
        else:
            raise FileNotFoundError(f"no layer directory or archive at {self.path}")

    def __len__(self) -> int:
        return len(self._members)

    def has_layer(self, k: int) -> bool:
        return layer_filename(self.n, k) in self._members

    def prefetch(self, ks) -> None:
        """Reads the archive members of layers ``ks`` in one sequential pass (a gzip
        stream has no random access: extracting members one by one re-reads it)."""
        if self._tar is None:
            return
        wanted = {
            self._members[layer_filename(self.n, k)]
            for k in ks
            if layer_filename(self.n, k) in self._members
        }
        for m in self._tar:
            if m.name in wanted and m.name not in self._cache:
                self._cache[m.name] = self._tar.extractfile(m).read()

    def read_bytes(self, k: int) -> tuple[bytes, str]:
        name = layer_filename(self.n, k)
        if name not in self._members:
            raise FileNotFoundError(f"missing layer file {name} in {self.path}")
        if self._tar is None:
            return Path(self._members[name]).read_bytes(), self._members[name]
        member = self._members[name]
        data = self._cache.pop(member, None)
        if data is None:
            data = self._tar.extractfile(member).read()
        return data, f"{self.path}:{member}"

    def close(self):
        if self._tar is not None:
            self._tar.close()


def read_layer(path: str | os.PathLike, n: int, *, dtype=np.float32) -> SparseMatrix:
    """Reads one layer file into an ``[n, n]`` :class:`SparseMatrix`."""
    data = Path(path).read_bytes()
    rows, cols, vals = _parse_triplets(data, str(path), (n, n), "layer")
    return SparseMatrix.from_triplets(rows, cols, vals, (n, n), dtype=dtype)


def read_layers(
    path: str | os.PathLike,
    n: int,
    n_layers: int,
    *,
    dtype=np.float32,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> list[SparseMatrix]:
    """Reads layers ``1..n_layers`` of an ``n``-neuron network from a directory or archive.

    ``progress`` optionally wraps the layer iterator (e.g. ``rich.progress.track``).
    """
    src = LayerSource(path, n)
    try:
        ks = range(1, n_layers + 1)
        missing = [k for k in ks if not src.has_layer(k)]
        if missing:
            raise FileNotFoundError(
                f"missing layer file {layer_filename(n, missing[0])} in {path} "
                f"({len(missing)} of {n_layers} layers missing)"
            )
        src.prefetch(ks)
        it = progress(ks) if progress else ks
        out = []
        for k in it:
            data, name = src.read_bytes(k)
            rows, cols, vals = _parse_triplets(data, name, (n, n), "layer")
            out.append(SparseMatrix.from_triplets(rows, cols, vals, (n, n), dtype=dtype))
        return out
    finally:
        src.close()


def write_layer(path: str | os.PathLike, W: SparseMatrix) -> None:
    """Writes ``W`` in the official layer format (1-based, sorted by output neuron)."""
    s = W.structure
    a = np.empty((W.nnz, 3))
    a[:, 0] = s.indices + 1
    a[:, 1] = s.row_ids + 1
    a[:, 2] = np.asarray(W.values, dtype=np.float64)
    np.savetxt(path, a, fmt=["%d", "%d", "%.6e"], delimiter="\t")


def write_layers(directory: str | os.PathLike, layers: list[SparseMatrix]) -> Path:
    """Writes ``n{N}-l{k}.tsv`` for every layer into ``directory`` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for k, W in enumerate(layers, start=1):
        write_layer(d / layer_filename(W.n_out, k), W)
    return d


def read_images(path: str | os.PathLike, n: int, n_images: int | None = None) -> sps.csr_matrix:
    """Reads ``sparse-images-{N}.tsv`` into a ``[n_images, n]`` float32 CSR matrix.

    ``n_images`` defaults to the largest image index in the file.
    """
    data = Path(path).read_bytes()
    big = np.iinfo(np.int64).max if n_images is None else n_images
    rows, cols, vals = _parse_triplets(data, str(path), (big, n), "images")
    m = int(rows.max()) + 1 if n_images is None and rows.size else (n_images or 0)
    out = sps.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(m, n))
    out.sum_duplicates()
    return out


def write_images(path: str | os.PathLike, x) -> None:
    """Writes ``[n_images, n]`` features (dense or scipy) in the official images format."""
    c = sps.coo_matrix(x)
    order = np.lexsort((c.col, c.row))
    a = np.stack([c.row[order] + 1, c.col[order] + 1, c.data[order]], axis=1)
    np.savetxt(path, a, fmt=["%d", "%d", "%.9g"], delimiter="\t")


def read_categories(path: str | os.PathLike) -> np.ndarray:
    """Reads a truth file: 1-based image indices -> sorted 0-based ``int64`` array."""
    text = Path(path).read_text()
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            v = int(line)
        except ValueError:
            raise ValueError(
                f"{path}: line {line_no}: expected an image index, got {line!r}"
            ) from None
        if v < 1:
            raise ValueError(f"{path}: line {line_no}: image index {v} out of range (1-based)")
        out.append(v - 1)
    return np.unique(np.asarray(out, np.int64))


def write_categories(path: str | os.PathLike, categories) -> None:
    """Writes 0-based image indices as the official 1-based, ascending truth file."""
    c = np.unique(np.asarray(categories, np.int64))
    np.savetxt(path, c + 1, fmt="%d")
