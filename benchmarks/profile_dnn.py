"""Run one generated Graph Challenge problem through SparseDNN a few times, for a profiler.

    python benchmarks/profile_dnn.py [--problem 1024-120] [--batch 60000] [--runs 2]
        [--tails off 8,32 4,16]

Prints the wall time of each run and the active rows after each layer, so a kernel
profile (e.g. Nsight Compute's per-launch durations) can be lined up with the layers.
With --tails, times each setting in the same process, in rounds, and checks that every
setting gives the same features.  A setting is ``default``, a value of SPDNN_FP_TAIL (the
footprint path's stationary tail), or ``+``-joined parts of either kind and
``tall=`` / ``direct=`` / ``prefetch=`` (SPDNN_STAT_TALL, SPDNN_STAT_DIRECT,
SPDNN_STAT_PREFETCH), e.g. ``0,32+tall=off``.  With --dispatch, also times how long the
host takes to enqueue calls whose device work is tiny (64 rows), and calls of a plain XLA
program with an output of the same size, to tell host time from device time.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

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
    p.add_argument(
        "--tails", nargs="*", default=[], help="SPDNN_FP_TAIL settings to compare ('default')"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds over --tails")
    p.add_argument("--dispatch", action="store_true", help="time the host's enqueue alone")
    a = p.parse_args()
    n, n_layers = (int(v) for v in a.problem.split("-"))
    layers = ch.radixnet(n, n_layers, seed=0)
    x = ch.digit_inputs(n, a.batch, seed=0)
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
    net = sd.SparseDNN(layers, bias, clip=32.0)
    xd = jnp.asarray(x.toarray(), jnp.float32)
    f = jax.jit(lambda net, x: net(x))
    if a.dispatch:
        dispatch(net, xd, max(a.calls, 1))
    if a.tails:  # SparseDNN reads SPDNN_FP_TAIL when called, so not under an outer jit
        compare_tails(net, xd, a.tails, a.calls, a.rounds)
        return
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


_SETTING_KEYS = {
    "tall": "SPDNN_STAT_TALL",
    "direct": "SPDNN_STAT_DIRECT",
    "prefetch": "SPDNN_STAT_PREFETCH",
}


def setting_env(setting: str) -> dict[str, str]:
    """The environment of a --tails setting (see the module docstring)."""
    env = {}
    for part in setting.split("+"):
        key, eq, value = part.partition("=")
        if eq:
            if key not in _SETTING_KEYS:
                raise SystemExit(f"profile_dnn: unknown setting {key!r} in {setting!r}")
            env[_SETTING_KEYS[key]] = value
        elif part != "default":
            env["SPDNN_FP_TAIL"] = part
    return env


def _enqueue(fn, calls):
    """Seconds per call for the host to enqueue `calls` calls, and until they are done."""
    r = jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(calls):
        r = fn()
    queued = time.perf_counter() - t0
    jax.block_until_ready(r)
    return queued / calls, (time.perf_counter() - t0) / calls


def dispatch(net, xd, calls):
    """Host enqueue time against device time: the network on 64 rows (device work
    small), on every row, and an XLA program writing an output of the network's size."""
    f = jax.jit(lambda net, x: net(x))
    small = xd[:64]
    scale = jax.jit(lambda x: (x * 2.0, jnp.any(x != 0, axis=1)))
    leaves = jax.jit(lambda net, x: x * 2.0 + net.layers[-1].values[0] + net.biases[0, 0])
    layer = jax.jit(lambda W, x: sd.sparse_linear(x, W, -0.3, clip=32.0))
    five = jax.jit(lambda net, x: sd.SparseDNN(net.layers[:5], net.biases[:5], clip=32.0)(x))
    for name, fn in (
        ("network, 64 rows", lambda: f(net, small)),
        ("network, every row", lambda: f(net, xd)),
        ("x * 2 (same output size)", lambda: scale(xd)),
        ("network, 64 rows, direct", lambda: net(small)),
        ("network as argument, x * 2", lambda: leaves(net, small)),
        ("one sparse_linear, 64 rows", lambda: layer(net.layers[0], small)),
        ("5-layer network, 64 rows", lambda: five(net, small)),
    ):
        q, t = _enqueue(fn, calls)
        print(
            f"dispatch {name:>28}: enqueued in {q * 1e3:.3f} ms, done in {t * 1e3:.3f} ms per call",
            flush=True,
        )


def compare_tails(net, xd, tails, calls, rounds):
    """Each setting called directly and through an outer jit (traced under the setting)."""
    first = {}
    keys = [(t, how) for t in tails for how in ("direct", "jit")]
    times = {k: [] for k in keys}
    hosts = {k: [] for k in keys}
    fns = {}
    for _ in range(rounds):
        for t, how in keys:
            env = setting_env(t)
            with mock.patch.dict(os.environ, env):
                if (t, how) not in fns:
                    fns[t, how] = net.__call__ if how == "direct" else jax.jit(lambda n, x: n(x))
                fn = fns[t, how]
                r = jax.block_until_ready(fn(net, xd) if how == "jit" else fn(xd))  # compiles
                first.setdefault(t, r)
                t0 = time.perf_counter()
                for _ in range(calls):
                    r = fn(net, xd) if how == "jit" else fn(xd)
                queued = time.perf_counter() - t0  # near the total: the host is the limit
                jax.block_until_ready(r)
                times[t, how].append((time.perf_counter() - t0) / calls)
                hosts[t, how].append(queued / calls)
    base = first[tails[0]]
    for t in tails:
        same = bool(jnp.array_equal(first[t].features, base.features)) and bool(
            jnp.array_equal(first[t].active_per_layer, base.active_per_layer)
        )
        ms = "; ".join(
            how
            + " "
            + " / ".join(f"{v * 1e3:.3f}" for v in times[t, how])
            + " (enqueued in "
            + " / ".join(f"{v * 1e3:.2f}" for v in hosts[t, how])
            + ")"
            for how in ("direct", "jit")
        )
        print(
            f"{t:>12}: {ms} ms per call; survivors "
            f"{int(first[t].active_per_layer[-1])}; same as {tails[0]}: {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
