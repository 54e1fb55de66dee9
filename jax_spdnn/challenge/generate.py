"""Generated Graph Challenge networks (RadiX-Net recipe) and inputs.

The official networks are a radix-2 RadiX-Net on ``N/16`` neurons, Kronecker
expanded by a 16 x 16 block of ones, with weights 1/16 (Kepner & Robinett,
"RadiX-Net", IPDPSW 2019).  With ``N' = N/16`` and ``K = log2(N')``, layer
``l`` (1-based) uses ``k = ((l-1) mod K) + 1`` and block ``b = (l-1) // K``::

    W_l(r, j) = 1/16  iff  (c_b(r) - j) mod N'  is 0 or 2^(k-1)

with ``c_0(r) = r mod N'`` and, for ``b >= 1``, ``c_b(r) = pi_b(r) mod N'`` for a
random permutation ``pi_b`` of ``0..N-1`` drawn per block from ``seed``.  Every
row and column has exactly 32 nonzeros.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sps

from jax_spdnn.sparse import SparseMatrix

CHALLENGE_BIAS = {1024: -0.30, 4096: -0.35, 16384: -0.40, 65536: -0.45}


def challenge_bias(n: int) -> float:
    """The official per-neuron bias for ``n`` neurons (all neurons share it)."""
    if n not in CHALLENGE_BIAS:
        raise ValueError(f"no official bias for N={n}; official N are {sorted(CHALLENGE_BIAS)}")
    return CHALLENGE_BIAS[n]


def _check_n(n: int) -> int:
    if n < 32 or n % 16 or (n // 16) & (n // 16 - 1):
        raise ValueError(f"RadiX-Net networks need N = 16 * 2^k with k >= 1, got N={n}")
    return int(np.log2(n // 16))


def _block_permutation(n: int, block: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, block]).permutation(n)


def _classes(n: int, block: int, seed: int) -> np.ndarray:
    """``c_b(r)`` for every input neuron ``r`` of a layer in ``block`` (0-based)."""
    n1 = n // 16
    r = np.arange(n, dtype=np.int64)
    return r % n1 if block == 0 else _block_permutation(n, block, seed) % n1


def radixnet_layer(n: int, layer: int, *, seed: int = 0, dtype=np.float32) -> SparseMatrix:
    """Layer ``layer`` (1-based) of the generated ``n``-neuron network: ``[n, n]``."""
    k_max = _check_n(n)
    if layer < 1:
        raise ValueError(f"layers are numbered from 1, got {layer}")
    n1 = n // 16
    k = (layer - 1) % k_max + 1
    c = _classes(n, (layer - 1) // k_max, seed)
    # Outputs j with (c - j) mod n1 in {0, 2^(k-1)}: two residues, 16 copies each.
    res = np.stack([c % n1, (c - (1 << (k - 1))) % n1], axis=1)  # [n, 2]
    j = (res[:, :, None] + n1 * np.arange(16)[None, None, :]).reshape(n, 32)
    rows = np.repeat(np.arange(n, dtype=np.int64), 32)
    return SparseMatrix.from_triplets(
        rows, j.reshape(-1), np.full(n * 32, 1.0 / 16), (n, n), dtype=dtype
    )


def radixnet(n: int, n_layers: int, *, seed: int = 0, dtype=np.float32) -> list[SparseMatrix]:
    """The first ``n_layers`` layers of the generated ``n``-neuron network."""
    return [radixnet_layer(n, l, seed=seed, dtype=dtype) for l in range(1, n_layers + 1)]


class RadixNetLayers(Sequence):
    """The generated ``n``-neuron network of ``n_layers`` layers, made on demand.

    A sequence of :class:`SparseMatrix` layers (``net[k]`` is
    ``radixnet_layer(n, k + 1, seed=seed)``, built when asked for, never all held), usable
    wherever a list of layers is.  It is also a *device layer source* for
    :func:`~jax_spdnn.stream_network` (and the streamed reference): every output neuron has
    ``degree = 32`` inputs, and :meth:`build_chunk` makes a chunk of layers on the device
    from :meth:`chunk_inputs`, one permutation class array per block of ``log2(n/16)``
    layers (``4 n`` bytes), so the 65536-1920 network (4.03e9 nonzeros) is never made or
    copied from host memory.  Device and host layers are identical (tested).
    """

    degree = 32

    def __init__(self, n: int, n_layers: int, *, seed: int = 0, dtype=np.float32):
        self.k_max = _check_n(n)
        if n_layers < 1:
            raise ValueError(f"RadixNetLayers needs at least one layer, got {n_layers}")
        self.n, self.n_layers, self.seed = int(n), int(n_layers), int(seed)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.n_layers))]
        k = int(k) + (self.n_layers if k < 0 else 0)
        if not 0 <= k < self.n_layers:
            raise IndexError(f"layer {k} out of range for {self.n_layers} layers")
        return radixnet_layer(self.n, k + 1, seed=self.seed, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"RadixNetLayers(n={self.n}, n_layers={self.n_layers}, seed={self.seed})"

    @property
    def nnz(self) -> int:
        """Nonzeros of the whole network."""
        return self.degree * self.n * self.n_layers

    def max_abs_column_sum(self, k: int) -> float:
        """``max_j sum_i |W_k[i, j]|`` (32 weights of 1/16 per output)."""
        return self.degree / 16.0

    def chunk_inputs(self, a: int, b: int) -> dict:
        """The small host arrays :meth:`build_chunk` makes layers ``a..b-1`` (0-based) from."""
        if not 0 <= a < b <= self.n_layers:
            raise IndexError(f"chunk [{a}, {b}) out of range for {self.n_layers} layers")
        layers = np.arange(a, b)
        blocks = layers // self.k_max
        first = int(blocks[0])
        classes = np.stack(
            [_classes(self.n, blk, self.seed) for blk in range(first, int(blocks[-1]) + 1)]
        )
        return {
            "classes": classes.astype(np.int32),  # [blocks, n]
            "block": (blocks - first).astype(np.int32),  # [b - a]
            "shift": (1 << (layers % self.k_max)).astype(np.int32),  # 2^(k-1)
        }

    @staticmethod
    def build_chunk(inputs: dict, dtype):
        """Traceable: the chunk's layers as ``indices [m, n, 32]`` (each output's inputs,
        ascending) and ``values [m, n, 32]`` of ``dtype``.  A function of ``inputs`` only
        (one compiled program for every network of the same shape)."""
        import jax
        import jax.numpy as jnp

        n = inputs["classes"].shape[1]
        n1 = n // 16
        # Input neurons grouped by class, ascending within each class (a stable sort).
        order = jnp.argsort(inputs["classes"], axis=1, stable=True).astype(jnp.int32)
        by_class = order.reshape(order.shape[0], n1, 16)
        j = jnp.arange(n, dtype=jnp.int32) % n1

        def layer(block, shift):
            # Output j takes the inputs of classes j and j + 2^(k-1) (mod n1).
            g = by_class[block]
            return jnp.sort(jnp.concatenate([g[j], g[(j + shift) % n1]], axis=1), axis=1)

        indices = jax.vmap(layer)(inputs["block"], inputs["shift"])
        return indices, jnp.full(indices.shape, 1.0 / 16, dtype)


def random_inputs(n: int, batch: int, *, density=(0.15, 0.35), seed: int = 0, dtype=np.float32):
    """``[batch, n]`` binary features.  ``density`` is the fraction of entries set
    to 1, or a ``(low, high)`` range from which each row draws its own."""
    rng = np.random.default_rng(seed)
    lo, hi = (density, density) if np.isscalar(density) else density
    d = rng.uniform(lo, hi, size=(batch, 1))
    return (rng.random((batch, n), dtype=np.float32) < d).astype(dtype)


def _resample_matrices(rng, count: int, side: int, src: int = 8) -> np.ndarray:
    """``[count, side, src]`` linear-interpolation matrices mapping a ``src``-pixel axis onto
    ``side`` pixels with a random scale (digit height 55-85% of the canvas) and offset."""
    scale = rng.uniform(0.55, 0.85, size=(count, 1)) * side / src  # output pixels per source pixel
    span = scale * src
    offset = rng.uniform(0, 1, size=(count, 1)) * (side - span)
    pos = (np.arange(side)[None, :] + 0.5 - offset) / scale - 0.5  # source coordinate per pixel
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    m = np.zeros((count, side, src))
    rows = np.arange(count)[:, None]
    cols = np.arange(side)[None, :]
    for k, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (k >= 0) & (k < src)
        np.add.at(
            m,
            (np.broadcast_to(rows, k.shape)[ok], np.broadcast_to(cols, k.shape)[ok], k[ok]),
            w[ok],
        )
    return m


def digit_inputs(
    n: int, batch: int = 60000, *, fill: float = 0.083, seed: int = 0, chunk: int = 2000
) -> sps.csr_matrix:
    """MNIST-like binary inputs ``[batch, n]`` (float32 CSR) from real handwriting.

    Each row is one of scikit-learn's 1797 8x8 handwritten digits, resampled onto a
    ``sqrt(n) x sqrt(n)`` canvas with a random size and position, then binarized by keeping
    its brightest pixels: about ``fill`` of the canvas (each image draws its own fraction
    within +-30% of it).  Deterministic for a given ``seed``.
    """
    from sklearn.datasets import load_digits

    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"digit_inputs needs a square number of neurons, got N={n}")
    digits = load_digits().images.astype(np.float64)  # [1797, 8, 8], values 0..16
    rng = np.random.default_rng([seed, 7])
    bits = rng.bit_generator

    def finish(imgs, ry, rx, noise_state, spread):
        """One chunk's images from its random draws (numpy releases the GIL: threads)."""
        m = imgs.shape[0]
        big = np.einsum("bys,bst,bxt->byx", ry, imgs, rx, optimize=True).reshape(m, n)
        noise_bits = np.random.PCG64()
        noise_bits.state = noise_state
        big += np.random.Generator(noise_bits).uniform(0, 1e-6, (m, n))  # random tie-breaks
        keep = np.clip(np.round(fill * spread * n), 1, n).astype(np.int64)
        # The keep-th largest per row: one partition at the smallest and largest keep, then
        # a sort of the band between them only.
        lo, hi = int(keep.min()) - 1, int(keep.max()) - 1
        band = np.sort(np.partition(-big, [lo, hi], axis=1)[:, lo : hi + 1], axis=1)
        thresh = -band[np.arange(m), keep - 1 - lo]
        rows, cols = np.nonzero((big >= thresh[:, None]) & (big > 1e-3))  # row-major
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])
        return sps.csr_matrix(
            (np.ones(cols.size, np.float32), cols.astype(np.int32), indptr), shape=(m, n)
        )

    # The draws stay in one sequence (results do not depend on the thread count); at most
    # `workers` chunks are in flight, bounding memory.
    workers = max(1, min(8, os.cpu_count() or 1))
    parts, pending = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, batch, chunk):
            m = min(chunk, batch - start)
            imgs = digits[rng.integers(0, len(digits), m)]
            ry = _resample_matrices(rng, m, side)
            rx = _resample_matrices(rng, m, side)
            # The tie-break noise (m * n doubles, one 64-bit draw each) is drawn by the
            # worker from a copy of the generator; this one jumps past it, keeping its
            # buffered 32-bit half (which doubles do not use) as the draws would have.
            noise_state = bits.state
            bits.advance(m * n)
            state = bits.state
            state["has_uint32"], state["uinteger"] = (
                noise_state["has_uint32"],
                noise_state["uinteger"],
            )
            bits.state = state
            spread = rng.uniform(0.7, 1.3, m)
            if len(pending) >= workers:
                parts.append(pending.pop(0).result())
            pending.append(pool.submit(finish, imgs, ry, rx, noise_state, spread))
        parts += [f.result() for f in pending]
    return sps.vstack(parts, format="csr")
