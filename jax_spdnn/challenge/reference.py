"""Float64 reference inference and the truth check, aware of exact ties.

The challenge recurrence (MATLAB ``inferenceReLUvec.m``) is ``Z = Y W; Y = Z + b (Z != 0);
Y(Y < 0) = 0; Y(Y > clip) = clip``; with non-positive biases this equals
``Y = min(max(Y W + b, 0), clip)``.

**Ties.** With weights like 1/16 and biases like -0.3 a pre-activation can be exactly zero in
exact arithmetic, and float rounding order then decides whether a neuron (and possibly an
image) survives.  With non-negative weights every output is monotone in every input, so
resolving all ties to 0 and all to a small positive value bounds every rounding order.  The
reference runs both bounds: a lower trajectory that subtracts a slack of ``tol * (1 + |z| +
|b|)`` from every stored pre-activation and an upper one that adds it (``tol`` covers float32
rounding of one layer).  Exact ties fall inside the slack; so do rows sitting on an unstable
fixed point of the recurrence (e.g. a uniform row at 0.3 with 32 weights of 1/16 and bias -0.3
maps to itself, and any rounding error doubles per layer), where no float implementation can
be expected to agree.  An image whose category differs between the two bounds is
*ambiguous*: it is left out of the exact comparison and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sps

from jax_spdnn.sparse import SparseMatrix

__all__ = ["ReferenceResult", "TruthCheck", "check_categories", "reference_inference"]


@dataclass
class ReferenceResult:
    """Categories (0-based surviving image indices) of the float64 reference.

    ``categories`` is the plain float64 result; ``categories_lower`` / ``categories_upper``
    come from the lower and upper bound trajectories; ``ambiguous`` are the images in the
    upper but not the lower one.  ``features`` holds the final float64 features (CSR).
    """

    categories: np.ndarray
    categories_lower: np.ndarray
    categories_upper: np.ndarray
    features: sps.csr_matrix
    active_per_layer: list[int] = field(default_factory=list)

    @property
    def ambiguous(self) -> np.ndarray:
        return np.setdiff1d(self.categories_upper, self.categories_lower)


def _to_scipy(W) -> sps.csr_matrix:
    if isinstance(W, SparseMatrix):
        return W.to_scipy().astype(np.float64).tocsr()
    return sps.csr_matrix(W, dtype=np.float64)


def _layer(y: sps.csr_matrix, w: sps.csr_matrix, b: np.ndarray, clip, side, tol):
    z = (y @ w).tocsr()
    z.sum_duplicates()
    # Bias on stored entries only (the official recurrence); biases are <= 0, so entries
    # that are not stored stay 0 after the ReLU either way.
    bz = b[z.indices]
    slack = side * tol * (1.0 + z.data + np.abs(bz)) if side else 0.0
    z.data = np.maximum(z.data + bz + slack, 0.0)
    if clip is not None:
        np.minimum(z.data, clip, out=z.data)
    z.eliminate_zeros()
    return z


def reference_inference(
    layers,
    biases,
    x,
    *,
    clip: float | None = 32.0,
    tol: float = 1e-6,
) -> ReferenceResult:
    """Runs the network in float64, plus its lower and upper bound trajectories.

    Args:
      layers: ``SparseMatrix`` or scipy matrices ``[n, n]`` (``W[i, j]``: input i -> output j).
      biases: one scalar or ``[n]`` per layer, or a single scalar for all layers; all <= 0.
      x: ``[batch, n]`` input features (dense or scipy).
      clip: upper clamp, or ``None``.
      tol: relative slack per layer of the bound trajectories (see the module docstring);
        ``tol=0`` gives three identical runs.
    """
    n_layers = len(layers)
    if np.ndim(biases) == 0 or (np.ndim(biases) == 1 and len(biases) != n_layers):
        biases = [biases] * n_layers
    ws = [_to_scipy(W) for W in layers]
    bs = [np.broadcast_to(np.asarray(b, np.float64), (w.shape[1],)) for b, w in zip(biases, ws)]
    if any(np.any(b > 0) for b in bs):
        raise ValueError("reference_inference: biases must be <= 0 (the challenge's recurrence)")
    y0 = sps.csr_matrix(x, dtype=np.float64)
    outs = []
    active = []
    for side in (0, -1, 1):
        y = y0
        for w, b in zip(ws, bs):
            y = _layer(y, w, b, clip, side, tol)
            if side == 0:
                active.append(int(np.count_nonzero(np.diff(y.indptr))))
        outs.append(y)
    cats = [np.flatnonzero(np.diff(y.indptr)).astype(np.int64) for y in outs]
    return ReferenceResult(cats[0], cats[1], cats[2], outs[0], active)


@dataclass
class TruthCheck:
    """Result of comparing categories with a reference or an official truth file."""

    passed: bool
    n_expected: int
    n_found: int
    n_ambiguous: int
    missing: np.ndarray  # expected but not found (unambiguous images)
    extra: np.ndarray  # found but not expected (unambiguous images)

    def summary(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        s = (
            f"{status}: {self.n_found} images found, {self.n_expected} expected, "
            f"{self.n_ambiguous} ambiguous (rounding-dependent)"
        )
        if not self.passed:
            s += f"; {len(self.missing)} missing, {len(self.extra)} extra"
            if len(self.missing):
                s += f"; first missing (1-based) {self.missing[:5] + 1}"
            if len(self.extra):
                s += f"; first extra (1-based) {self.extra[:5] + 1}"
        return s


def check_categories(found, expected, ambiguous=()) -> TruthCheck:
    """Compares 0-based categories exactly, ignoring ``ambiguous`` images."""
    found = np.unique(np.asarray(found, np.int64))
    expected = np.unique(np.asarray(expected, np.int64))
    amb = np.unique(np.asarray(ambiguous, np.int64))
    missing = np.setdiff1d(np.setdiff1d(expected, found), amb)
    extra = np.setdiff1d(np.setdiff1d(found, expected), amb)
    passed = missing.size == 0 and extra.size == 0
    return TruthCheck(passed, expected.size, found.size, amb.size, missing, extra)


def reference_inference_fast(
    layers,
    biases,
    x,
    *,
    clip: float = 32.0,
    tol: float = 1e-6,
    n_layers: int | None = None,
    chunk_layers: int | None = None,
    device=None,
    batch_chunk: int | None = None,
):
    """The same contract as :func:`reference_inference`, computed with the library's own
    network kernel in float64 (dead rows skipped), for challenge-sized problems.

    The bound trajectories shift every bias by ``-s_l`` and ``+s_l`` with the per-layer
    constant ``s_l = tol * (1 + max|b_l| + clip * max_j sum_i |W_l[i, j]|)``, an upper bound
    of the relative slack used by :func:`reference_inference`.  With non-negative weights
    the network is monotone in its biases, so the two runs bound every rounding order.

    Args:
      layers: ``SparseMatrix`` layers, or a function ``k -> SparseMatrix`` (0-based) with
        ``n_layers``, or a device layer source such as
        :class:`~jax_spdnn.challenge.RadixNetLayers`; with a function, a source or
        ``chunk_layers`` the network is streamed through :func:`~jax_spdnn.stream_network`
        in chunks and never held whole (each of the three runs makes every layer again; a
        device source makes them on ``device``).
      device: where the float64 runs go: the host CPU by default, or e.g. a GPU
        (``jax.devices()[0]``) for large problems.
      batch_chunk: rows per pass (rows are independent), to bound device memory.
    """
    import jax
    import jax.numpy as jnp

    if clip is None or not np.isfinite(clip):
        raise ValueError("reference_inference_fast needs a finite clip; use reference_inference")
    if batch_chunk is not None and batch_chunk < 1:
        raise ValueError(f"reference_inference_fast: batch_chunk must be >= 1, got {batch_chunk}")
    x = sps.csr_matrix(x) if sps.issparse(x) else np.asarray(x)
    rows, n = x.shape
    device = jax.local_devices(backend="cpu")[0] if device is None else device
    from jax_spdnn.stream import _is_device_source

    streamed = callable(layers) or chunk_layers is not None or _is_device_source(layers)
    step = batch_chunk or max(rows, 1)
    cats, feats, active = ([], [], []), [], 0
    with jax.enable_x64(True), jax.default_device(device):
        if streamed:
            run = _streamed_runs(layers, biases, n, clip, tol, n_layers, chunk_layers or 120)
        else:
            run = _whole_runs(layers, biases, clip, tol)
        for start in range(0, max(rows, 1), step):
            xb = x[start : start + step]
            xd = jnp.asarray(xb.toarray() if sps.issparse(xb) else xb, jnp.float64)
            runs = run(xd)
            found = [r.categories().astype(np.int64) for r in runs]
            feats.append(_rows_csr(runs[0].features, found[0], xd.shape[0]))
            active = active + np.asarray(runs[0].active_per_layer, np.int64)
            for i, c in enumerate(found):
                cats[i].append(c + start)
    cats = [np.concatenate(c) for c in cats]
    features = sps.vstack(feats).tocsr() if feats else sps.csr_matrix((rows, n))
    return ReferenceResult(cats[0], cats[1], cats[2], features, [int(v) for v in active])


def _rows_csr(features, keep, rows: int):
    """Device ``features`` as a ``[rows, n]`` CSR matrix, moving only the rows ``keep``
    (those with a nonzero feature; the others are zero) off the device: at 16384 neurons
    the whole array is 1.3 GB per 10000 rows, the surviving rows a few percent of it."""
    n = features.shape[1]
    if keep.size == 0:
        return sps.csr_matrix((rows, n), dtype=features.dtype)
    part = sps.csr_matrix(np.asarray(features[keep]))
    coo = part.tocoo()
    return sps.csr_matrix((coo.data, (keep[coo.row], coo.col)), shape=(rows, n))


def _whole_runs(layers, biases, clip, tol):
    """The three float64 runs (plain, lower, upper) of a network held in memory."""
    import jax.numpy as jnp

    from jax_spdnn.dnn import SparseDNN

    layers = list(layers)
    n_layers = len(layers)
    if np.ndim(biases) == 0 or (np.ndim(biases) == 1 and len(biases) != n_layers):
        biases = [biases] * n_layers
    n = layers[0].n_out
    b = np.stack([np.broadcast_to(np.asarray(v, np.float64), (n,)) for v in biases])
    if np.any(b > 0):
        raise ValueError("reference_inference_fast: biases must be <= 0")
    row_sums = np.array([np.abs(W.to_scipy()).sum(axis=0).max() if W.nnz else 0.0 for W in layers])
    slack = tol * (1.0 + np.abs(b).max(axis=1) + clip * row_sums)
    layers64 = [W.astype(np.float64) for W in layers]
    nets = [
        SparseDNN(layers64, jnp.asarray(np.minimum(b + shift * slack[:, None], 0.0)), clip=clip)
        for shift in (0.0, -1.0, 1.0)
    ]
    return lambda xd: [net(xd, drop_dead_rows=True) for net in nets]


def _streamed_runs(layers, biases, n, clip, tol, n_layers, chunk):
    """The three float64 runs of a network streamed in chunks of layers."""
    from jax_spdnn.stream import _bias_source, _is_device_source, _layer_source, stream_network

    get_layer, L = _layer_source(layers, n_layers)
    get_bias = _bias_source(biases, L, n)
    last = {}

    def layer64(k):  # made once per run; the bias of layer k asks for it right after
        if k not in last:
            last.clear()
            last[k] = get_layer(k).astype(np.float64)
        return last[k]

    def column_sum(k):  # max_j sum_i |W_k[i, j]|, for the slack
        if hasattr(layers, "max_abs_column_sum"):  # known without making the layer
            return float(layers.max_abs_column_sum(k))
        W = layer64(k)
        return np.abs(W.to_scipy()).sum(axis=0).max() if W.nnz else 0.0

    # A device source makes its layers on the device, in float64 when asked.
    source = layers if _is_device_source(layers) else layer64

    def bias_of(shift):
        def bias(k):
            b = np.broadcast_to(np.asarray(get_bias(k), np.float64), (n,))
            if np.any(b > 0):
                raise ValueError("reference_inference_fast: biases must be <= 0")
            slack = tol * (1.0 + np.abs(b).max() + clip * column_sum(k))
            return np.minimum(b + shift * slack, 0.0)

        return bias

    def run(xd):
        return [
            stream_network(
                source,
                xd,
                bias_of(shift),
                n_layers=L,
                clip=clip,
                chunk_layers=chunk,
                drop_dead_rows=True,
            )
            for shift in (0.0, -1.0, 1.0)
        ]

    return run
