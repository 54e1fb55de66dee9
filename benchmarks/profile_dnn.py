"""Run one generated Graph Challenge problem through SparseDNN a few times, for a profiler.

    python benchmarks/profile_dnn.py [--problem 1024-120] [--batch 60000] [--runs 2]

Prints the wall time of each run and the active rows after each layer, so a kernel
profile (e.g. Nsight Compute's per-launch durations) can be lined up with the layers.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_spdnn as sd
from jax_spdnn import challenge as ch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="1024-120")
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--calls", type=int, default=10, help="back-to-back calls timed (0: none)")
    a = p.parse_args()
    n, n_layers = (int(v) for v in a.problem.split("-"))
    layers = ch.radixnet(n, n_layers, seed=0)
    x = ch.digit_inputs(n, a.batch, seed=0)
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
    net = sd.SparseDNN(layers, bias, clip=32.0)
    xd = jnp.asarray(x.toarray(), jnp.float32)
    f = jax.jit(lambda net, x: net(x))
    for k in range(a.runs):
        t0 = time.perf_counter()
        r = jax.block_until_ready(f(net, xd))
        print(f"run {k}: {time.perf_counter() - t0:.6f} s", flush=True)
    k = a.calls
    if k > 0:
        t0 = time.perf_counter()
        for _ in range(k):
            r = f(net, xd)
        jax.block_until_ready(r)
        print(
            f"{k} calls back to back: {(time.perf_counter() - t0) / k:.6f} s per call", flush=True
        )
    print("active per layer:", np.asarray(r.active_per_layer).tolist())


if __name__ == "__main__":
    main()
