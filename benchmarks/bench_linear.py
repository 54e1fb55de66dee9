"""One challenge-sized sparse layer, side by side with what users would otherwise run.

Layer: ``Y = min(max(X W + b, 0), 32)``, ``W`` N x N with 32 nonzeros per output
(value 1/16), ``b = -0.3``, X dense float32 [batch, N].  Two patterns: ``random`` (32
random inputs per output, about 32 per input: no two outputs share much) and
``radixnet`` (layer 13 of the generated Graph Challenge network, a permuted block:
the structure the challenge's layers have).

GPU peers: ``jax.experimental.sparse`` BCSR (cuSPARSE SpMM) + clamp, and dense
XLA matmul (bfloat16; float32 at default precision).  CPU peer: scipy.sparse.
Each GPU layer is applied ``iters`` times inside one compiled loop so dispatch
overhead does not count.  Reports time, tera-edges/s and the fraction of the
bandwidth floor (features read + written + weights read, over the measured
device copy bandwidth).

    python benchmarks/bench_linear.py [--neurons 1024 4096 16384] [--batch 60000]
        [--patterns random radixnet]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    copy_bandwidth,
    environment,
    random_regular_layer,
    time_fn,
    time_iterated,
)

import jax_spdnn as sd  # noqa: E402

BIAS, CLIP = -0.3, 32.0


def layer_matrix(pattern, n):
    """The benchmark layer as a ``scipy.sparse.csc_matrix`` [n_in, n_out]."""
    if pattern == "random":
        return random_regular_layer(n, seed=n)
    if pattern == "radixnet":
        from jax_spdnn import challenge as ch

        return ch.radixnet_layer(n, 13, seed=0).to_scipy()
    raise ValueError(f"unknown pattern {pattern!r} (random or radixnet)")


def gpu_rows(n, batch, bw, iters, ours_only=False, pattern="random", dtype="float32"):
    from jax.experimental import sparse as jsparse

    # Without this flag jax.experimental.sparse lowers to XLA gathers, not cuSPARSE.
    jax.config.update("jax_bcoo_cusparse_lowering", True)

    w = layer_matrix(pattern, n)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    nnz = W.nnz
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(key, (batch, n), jnp.float32).astype(dtype)
    edges = batch * nnz
    floor_s = (2 * batch * n * x.dtype.itemsize + nnz * 8) / bw
    rows = []

    def record(name, seconds, check=None):
        rows.append(
            {
                "N": n,
                "pattern": pattern,
                "batch": batch,
                "method": name if dtype == "float32" else f"{name} [{dtype} features]",
                "ms": seconds * 1e3,
                "TE/s": edges / seconds / 1e12,
                "floor_ms": floor_s * 1e3,
                "pct_floor": 100 * floor_s / seconds,
                "max_abs_diff": check,
            }
        )

    tag = (
        f" [SPDNN_LINEAR_OUTS={os.environ['SPDNN_LINEAR_OUTS']}]"
        if "SPDNN_LINEAR_OUTS" in os.environ
        else ""
    )
    # Every CUDA kernel (SPDNN_LINEAR_KERNEL is read when a call is lowered: a new function
    # object is traced under each setting); the one auto picks is marked "default".
    default = sd.linear.cuda_route(W.structure, sd.linear.ACTIVATIONS["relu"], x.dtype)
    y_ours = None
    for kernel in ("layer", "footprint", "stationary"):
        with mock.patch.dict(os.environ, {"SPDNN_LINEAR_KERNEL": kernel}):
            f = lambda h: sd.sparse_linear(h, W, BIAS, clip=CLIP)  # noqa: E731
            y = jax.jit(f)(x)
            diff = None if y_ours is None else float(jnp.max(jnp.abs(y - y_ours)))
            y_ours = y if y_ours is None else y_ours
            mark = ", default" if kernel == default else ""
            record(
                f"jax_spdnn sparse_linear ({kernel} kernel{mark}){tag}",
                time_iterated(f, x, iters=iters),
                diff,
            )
            del y
    if ours_only or dtype != "float32":  # the peers are float32 products
        return rows

    wt = jsparse.BCSR.from_scipy_sparse(w.T.tocsr().astype(np.float32))

    def cusparse(h):
        return jnp.clip((wt @ h.T).T + BIAS, 0.0, CLIP)

    y_cs = jax.jit(cusparse)(x)
    record(
        "jax.experimental.sparse BCSR (cuSPARSE) + clamp",
        time_iterated(cusparse, x, iters=iters),
        float(jnp.max(jnp.abs(y_cs - y_ours))),
    )

    wd = jnp.asarray(w.toarray(), jnp.float32)
    for name, dt in (
        ("dense XLA matmul bf16", jnp.bfloat16),
        ("dense XLA matmul f32 (default precision)", jnp.float32),
    ):
        wdt = wd.astype(dt)

        def dense(h, wdt=wdt, dt=dt):
            return jnp.clip(jnp.dot(h.astype(dt), wdt) + BIAS, 0.0, CLIP).astype(jnp.float32)

        y_d = jax.jit(dense)(x)
        record(name, time_iterated(dense, x, iters=iters), float(jnp.max(jnp.abs(y_d - y_ours))))
    del wd
    return rows


def cpu_rows(n, batch, pattern="random"):
    w = layer_matrix(pattern, n)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.random((batch, n), dtype=np.float32)
    edges = batch * W.nnz
    rows = []
    f = jax.jit(lambda h: sd.sparse_linear(h, W, BIAS, clip=CLIP))
    xj = jnp.asarray(x)
    t = time_fn(f, xj, trials=3, min_time=0.5)
    y = np.asarray(f(xj))
    rows.append(
        {
            "N": n,
            "pattern": pattern,
            "batch": batch,
            "method": "jax_spdnn sparse_linear (CPU)",
            "ms": t * 1e3,
            "TE/s": edges / t / 1e12,
        }
    )
    wcsr = w.tocsr().astype(np.float32)

    def scipy_layer():
        return np.clip(x @ wcsr + BIAS, 0.0, CLIP)  # x @ csr: scipy's dense x sparse product

    y_ref = scipy_layer()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        scipy_layer()
        samples.append(time.perf_counter() - t0)
    t = float(np.median(samples))
    rows.append(
        {
            "N": n,
            "pattern": pattern,
            "batch": batch,
            "method": "scipy.sparse + clip",
            "ms": t * 1e3,
            "TE/s": edges / t / 1e12,
            "max_abs_diff": float(np.max(np.abs(y_ref - y))),
        }
    )
    return rows


def print_table(rows, env, bw=None):
    e = env
    print(f"\n{e['device']} ({e['platform']}), jax {e['jax']}, jaxlib {e['jaxlib']}, {e['date']}")
    if bw:
        print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    print("| N | pattern | batch | method | ms | TE/s | % of floor | max |diff| vs ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pf = f"{r['pct_floor']:.1f}" if r.get("pct_floor") is not None else "-"
        d = f"{r['max_abs_diff']:.2g}" if r.get("max_abs_diff") is not None else "-"
        cells = [
            r["N"],
            r.get("pattern", "random"),
            r["batch"],
            r["method"],
            f"{r['ms']:.3f}",
            f"{r['TE/s']:.3f}",
            pf,
            d,
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--neurons", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=None, help="default 60000 on GPU, 4000 on CPU")
    p.add_argument(
        "--patterns", nargs="+", default=["random", "radixnet"], choices=["random", "radixnet"]
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="feature dtype (GPU; peers only with float32)",
    )
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--ours-only", action="store_true", help="skip the peers (kernel tuning runs)")
    args = p.parse_args(argv)
    env = environment()
    rows = []
    bw = None
    if env["platform"] == "gpu" or env["platform"] == "cuda":
        bw = copy_bandwidth()
        for pattern in args.patterns:
            for n in args.neurons:
                rows += gpu_rows(
                    n, args.batch or 60000, bw, args.iters, args.ours_only, pattern, args.dtype
                )
    else:
        for pattern in args.patterns:
            for n in args.neurons:
                rows += cpu_rows(n, args.batch or 4000, pattern)
    print_table(rows, env, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
