"""A/B timing of native settings (environment variables read at every call) in one process.

    python benchmarks/ab_env.py --problem 65536-120 [--chunk-layers 120] [--batch 60000]
        --var SPDNN_FP_RUN_TILES --values 8 4 2 [--rounds 2] [--calls 2]

Makes the problem once (a streamed network with --chunk-layers, else a ``SparseDNN``),
then, in rounds, sets the variable to each value and times back-to-back calls (wall time
per call; a streamed call makes its chunks on the device again, as ``bench_dnn.py`` times
it). Every value must give the same survivors per layer and the same categories as the
first, or the script fails.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_spdnn as sd
from jax_spdnn import challenge as ch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="16384-120")
    p.add_argument("--chunk-layers", type=int, default=0, help="stream in chunks (0: SparseDNN)")
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--var", required=True, help="the environment variable to vary")
    p.add_argument("--values", nargs="+", required=True, help="its values ('unset' unsets it)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="calls timed per value and round")
    a = p.parse_args(argv)
    n, n_layers = (int(v) for v in a.problem.split("-"))
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
    x = jnp.asarray(ch.digit_inputs(n, a.batch, seed=0).toarray(), jnp.float32)
    if a.chunk_layers:
        net = ch.RadixNetLayers(n, n_layers, seed=0)

        def call():
            return sd.stream_network(net, x, bias, clip=32.0, chunk_layers=a.chunk_layers)
    else:
        dnn = sd.SparseDNN(ch.radixnet(n, n_layers, seed=0), bias, clip=32.0)
        f = jax.jit(lambda d, x: d(x))

        def call():
            return f(dnn, x)

    def setting(value):
        if value == "unset":
            os.environ.pop(a.var, None)
        else:
            os.environ[a.var] = value

    first = None
    times: dict[str, list[float]] = {v: [] for v in a.values}
    for r in range(a.rounds):
        for v in a.values:
            setting(v)
            out = jax.block_until_ready(call())  # warm (compiles in the first round)
            got = (np.asarray(out.active_per_layer), np.asarray(out.categories()))
            del out
            if first is None:
                first = got
            elif not (np.array_equal(got[0], first[0]) and np.array_equal(got[1], first[1])):
                raise SystemExit(f"{a.var}={v}: survivors or categories differ from {a.values[0]}")
            for _ in range(a.calls):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times[v].append(time.perf_counter() - t0)
            print(f"round {r} {a.var}={v}: {min(times[v][-a.calls :]):.4f} s", flush=True)
    edges = a.batch * (net.nnz if a.chunk_layers else dnn.nnz)
    for v in a.values:
        best = min(times[v])
        print(f"{a.problem} {a.var}={v}: best {best:.4f} s, {edges / best / 1e12:.2f} TE/s")


if __name__ == "__main__":
    main()
