"""Timing helpers shared by the benchmarks: repeated runs inside one compiled
program (so dispatch overhead is amortised), medians, and the device's measured
copy bandwidth (bytes read + written per second)."""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax


def time_fn(fn, *args, trials: int = 5, min_time: float = 0.2) -> float:
    """Median seconds per call of a jitted ``fn(*args)`` (after a warm-up)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    reps = max(1, int(min_time / max(once, 1e-6)))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def time_once(fn, *args) -> float:
    """Seconds of one call of ``fn(*args)``, until its results are ready (for long calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def time_iterated(layer, x, *, iters: int = 20, trials: int = 5) -> float:
    """Median seconds per application of ``layer: x -> x`` run ``iters`` times in
    one ``fori_loop`` program, so each application pays no dispatch overhead."""

    @jax.jit
    def run(x):
        return lax.fori_loop(0, iters, lambda i, h: layer(h), x)

    return time_fn(run, x, trials=trials, min_time=0.0) / iters


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Measured device bandwidth (bytes read + written per second) of a large copy."""
    n = n_bytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    f = jax.jit(lambda a: a * 1.000001 + 1.0)
    t = time_fn(f, x, trials=5, min_time=0.3)
    return 2 * n * 4 / t


def environment() -> dict:
    dev = jax.devices()[0]
    import jax_spdnn

    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_spdnn": jax_spdnn.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": date.today().isoformat(),
    }


def random_regular_layer(n: int, k: int = 32, seed: int = 0):
    """A random ``n x n`` weight matrix with exactly ``k`` nonzeros per output
    (and about ``k`` per input: a union of ``k`` random permutations, outputs
    whose draws collide redrawn), all ``1/16`` as in the Graph Challenge;
    returned as a ``scipy.sparse.csc_matrix`` [n_in, n_out]."""
    import scipy.sparse as sps

    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(n) for _ in range(k)], axis=1)  # [n_out, k] inputs
    s = np.sort(idx, axis=1)
    for j in np.nonzero(np.any(s[:, 1:] == s[:, :-1], axis=1))[0]:
        idx[j] = rng.choice(n, k, replace=False)
    rows = idx.reshape(-1)
    cols = np.repeat(np.arange(n), k)
    return sps.csc_matrix((np.full(n * k, 1.0 / 16), (rows, cols)), shape=(n, n))
