"""Run the benchmark layer of ``bench_linear.py`` once per feature dtype, for a profiler.

    python benchmarks/profile_linear.py [--neurons 16384] [--pattern random]
        [--dtypes float32 bfloat16] [--batch 60000]

Each dtype's layer is compiled and run twice (the second run is the one to profile, e.g.
Nsight Compute with ``--launch-skip 1`` per dtype); ``SPDNN_LINEAR_KERNEL`` picks the kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import BIAS, CLIP, layer_matrix  # noqa: E402

import jax_spdnn as sd  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neurons", type=int, default=16384)
    p.add_argument("--pattern", default="random")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=60000)
    a = p.parse_args()
    W = sd.SparseMatrix.from_scipy(layer_matrix(a.pattern, a.neurons), dtype=np.float32)
    f = jax.jit(lambda h: sd.sparse_linear(h, W, BIAS, clip=CLIP))
    for dtype in a.dtypes:
        x = jax.random.uniform(jax.random.PRNGKey(0), (a.batch, a.neurons)).astype(dtype)
        for k in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            print(f"{dtype} run {k}: {time.perf_counter() - t0:.6f} s", flush=True)
        del x


if __name__ == "__main__":
    main()
