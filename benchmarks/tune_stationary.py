"""Tuning run of the stationary-rows ``sparse_linear`` kernel: rows per tile
(``SPDNN_STAT_ROWS``), threads per block (``SPDNN_STAT_THREADS``) and the bank schedule
(``SPDNN_STAT_SCHEDULE``), on the benchmark layer of ``bench_linear.py``, all in one process.

    python benchmarks/tune_stationary.py [--neurons 1024 4096 16384] [--patterns random]
        [--rows 3 5 13 15] [--threads 512 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_linear import BIAS, CLIP, layer_matrix  # noqa: E402
from common import environment, time_iterated  # noqa: E402

import jax_spdnn as sd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--neurons", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--patterns", nargs="+", default=["random"])
    p.add_argument("--rows", type=int, nargs="+", default=[3, 5, 9, 13, 15])
    p.add_argument("--threads", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    env = environment()
    print(f"{env['device']}, jax {env['jax']}, {env['date']}")
    print("| N | pattern | schedule | rows cap | threads | ms | TE/s |")
    print("|---|---|---|---|---|---|---|")
    with mock.patch.dict(os.environ, {"SPDNN_LINEAR_KERNEL": "stationary"}):
        for pattern in args.patterns:
            for n in args.neurons:
                W = sd.SparseMatrix.from_scipy(layer_matrix(pattern, n), dtype=np.float32)
                x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, n), jnp.float32)
                for schedule in ("1", "0"):  # read when a call is lowered: traced per setting

                    def f(h, W=W):
                        return sd.sparse_linear(h, W, BIAS, clip=CLIP)

                    for rows in args.rows:
                        for threads in args.threads:
                            env = {
                                "SPDNN_STAT_SCHEDULE": schedule,
                                "SPDNN_STAT_ROWS": str(rows),
                                "SPDNN_STAT_THREADS": str(threads),
                            }
                            with mock.patch.dict(os.environ, env):
                                t = time_iterated(f, x, iters=args.iters, trials=3)
                            te = args.batch * W.nnz / t / 1e12
                            print(
                                f"| {n} | {pattern} | {schedule == '1'} | {rows} | {threads} | "
                                f"{t * 1e3:.3f} | {te:.3f} |",
                                flush=True,
                            )


if __name__ == "__main__":
    main()
