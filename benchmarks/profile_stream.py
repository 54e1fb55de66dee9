"""Where the host time of a streamed network call goes (cProfile of one warm call).

    python benchmarks/profile_stream.py [--problem 1024-480] [--chunk-layers 120] [--batch 60000]

Prints the call's wall time, the device time of its chunks alone (each chunk's call timed
back to back on the same inputs) and the functions with the most cumulative host time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import jax
import jax.numpy as jnp

import jax_spdnn as sd
from jax_spdnn import challenge as ch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="1024-480")
    p.add_argument("--chunk-layers", type=int, default=120)
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    n, n_layers = (int(v) for v in a.problem.split("-"))
    src = ch.RadixNetLayers(n, n_layers, seed=0)
    x = jnp.asarray(ch.digit_inputs(n, a.batch, seed=0).toarray(), jnp.float32)
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3

    def run():
        return sd.stream_network(src, x, bias, chunk_layers=a.chunk_layers)

    jax.block_until_ready(run())  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    print(f"{a.problem}: {time.perf_counter() - t0:.4f} s per call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    jax.block_until_ready(run())
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
