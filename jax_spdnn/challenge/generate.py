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

import numpy as np

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


def radixnet_layer(n: int, layer: int, *, seed: int = 0, dtype=np.float32) -> SparseMatrix:
    """Layer ``layer`` (1-based) of the generated ``n``-neuron network: ``[n, n]``."""
    k_max = _check_n(n)
    if layer < 1:
        raise ValueError(f"layers are numbered from 1, got {layer}")
    n1 = n // 16
    k = (layer - 1) % k_max + 1
    b = (layer - 1) // k_max
    r = np.arange(n, dtype=np.int64)
    c = r % n1 if b == 0 else _block_permutation(n, b, seed) % n1
    # Outputs j with (c - j) mod n1 in {0, 2^(k-1)}: two residues, 16 copies each.
    res = np.stack([c % n1, (c - (1 << (k - 1))) % n1], axis=1)  # [n, 2]
    j = (res[:, :, None] + n1 * np.arange(16)[None, None, :]).reshape(n, 32)
    rows = np.repeat(r, 32)
    return SparseMatrix.from_triplets(
        rows, j.reshape(-1), np.full(n * 32, 1.0 / 16), (n, n), dtype=dtype
    )


def radixnet(n: int, n_layers: int, *, seed: int = 0, dtype=np.float32) -> list[SparseMatrix]:
    """The first ``n_layers`` layers of the generated ``n``-neuron network."""
    return [radixnet_layer(n, l, seed=seed, dtype=dtype) for l in range(1, n_layers + 1)]


def random_inputs(n: int, batch: int, *, density=(0.15, 0.35), seed: int = 0, dtype=np.float32):
    """``[batch, n]`` binary features.  ``density`` is the fraction of entries set
    to 1, or a ``(low, high)`` range from which each row draws its own."""
    rng = np.random.default_rng(seed)
    lo, hi = (density, density) if np.isscalar(density) else density
    d = rng.uniform(lo, hi, size=(batch, 1))
    return (rng.random((batch, n), dtype=np.float32) < d).astype(dtype)
