"""Whole-network Graph Challenge inference: SparseDNN side by side with per-layer peers.

For each (N, L): the generated network (RadiX-Net recipe) and 60000 MNIST-like inputs.
Times inference only (network and inputs on the device), reports tera-edges/s
(60000 * sum nnz / time), the bandwidth floor (bytes of active rows read and written,
summed over layers, over the measured copy bandwidth) and the truth check against the
float64 reference.  Peers (GPU): jax.experimental.sparse BCSR (cuSPARSE) + clamp per layer
and dense bf16 matmul per layer, both over all rows in one jitted program.

    python benchmarks/bench_dnn.py [--problems 1024-120 4096-120] [--batch 60000]
    python benchmarks/bench_dnn.py --problems 1024-120 1024-480 1024-1920 4096-120 4096-480 \
        4096-1920 16384-120 16384-480 16384-1920 65536-120 65536-480 65536-1920 \
        --reference-device default       # every problem the issue lists, checked on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth, environment, time_fn, time_once  # noqa: E402

import jax_spdnn as sd  # noqa: E402
from jax_spdnn import challenge as ch  # noqa: E402

_REFERENCES = {}
# Generated networks above this many nonzeros are streamed by
# default: as SparseDNN their packed index arrays (~13 bytes per nonzero) become constants
# of the compiled program, ~0.8 GB at 1024-1920 and 4096-480 (25-28 s to trace, pack and
# compile on the first call).
STREAM_NNZ = 64 * 2**20


def _make_seconds(source, chunk_layers, dtype) -> float:
    """Seconds to make and pack every chunk of ``source`` on the device, alone."""
    from jax.sharding import SingleDeviceSharding

    from jax_spdnn import stream

    platform = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    acc = np.dtype(np.float64 if dtype == jnp.float64 else np.float32)
    make = stream._device_chunk(
        source.build_chunk, platform, acc, SingleDeviceSharding(jax.devices()[0])
    )
    bounds = [(a, min(a + chunk_layers, len(source))) for a in range(0, len(source), chunk_layers)]
    jax.block_until_ready(make(source.chunk_inputs(*bounds[0])))
    t0 = time.perf_counter()
    for a, b in bounds:
        jax.block_until_ready(make(source.chunk_inputs(a, b)))
    return time.perf_counter() - t0


def run_problem(
    n,
    n_layers,
    batch,
    bw,
    peers,
    dtype,
    variants=(("auto", None),),
    chunk_layers=0,
    check="cpu",
    stream_trials=3,
):
    t0 = time.perf_counter()
    if chunk_layers:  # made on the device chunk by chunk, never held whole
        layers = net = ch.RadixNetLayers(n, n_layers, seed=0)
    else:
        layers = ch.radixnet(n, n_layers, seed=0)
    x = ch.digit_inputs(n, batch, seed=0)
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
    gen_s = time.perf_counter() - t0
    if not chunk_layers:
        net = sd.SparseDNN(layers, bias, clip=32.0)
    xd = jnp.asarray(x.toarray(), dtype)
    edges = batch * net.nnz
    ref = _REFERENCES.get((n, n_layers, batch, check))
    if check and ref is None:  # once per problem, for every dtype
        t0 = time.perf_counter()
        # On the device: as many rows per float64 pass as ~28 GB holds (input, output and
        # the kernel's buffers, ~5 float64 [rows, n] arrays): 10681 rows at 65536 neurons,
        # every row up to 8192; each pass makes a streamed network's layers again.
        rows_per_pass = min(batch, max(1000, int(28e9 / (5 * 8 * n))))
        where = {} if check == "cpu" else {"device": jax.devices()[0], "batch_chunk": rows_per_pass}
        if chunk_layers or n_layers > 120:  # long networks: the reference in chunks
            where["chunk_layers"] = chunk_layers or 120
        ref = ch.reference_inference_fast(layers, bias, x, clip=32.0, **where)
        _REFERENCES[(n, n_layers, batch, check)] = ref
        print(f"{n}-{n_layers}: float64 reference in {time.perf_counter() - t0:.1f} s", flush=True)

    def truth(found):
        if ref is None:
            return "not checked (--no-check)"
        return ch.check_categories(found, ref.categories, ref.ambiguous).summary()

    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    floor_s = float("nan")
    for kernel, segments in variants:
        os.environ["SPDNN_DNN_KERNEL"] = kernel
        if segments:
            os.environ["SPDNN_DNN_SEGMENTS"] = segments
        else:
            os.environ.pop("SPDNN_DNN_SEGMENTS", None)
        if chunk_layers:  # every call makes each chunk on the device again
            f = lambda net, x: sd.stream_network(  # noqa: E731
                net, x, bias, clip=32.0, chunk_layers=chunk_layers
            )
            # Compile on a two-chunk prefix (the same programs), then time whole calls.
            prefix = ch.RadixNetLayers(n, min(n_layers, 2 * chunk_layers), seed=0)
            jax.block_until_ready(f(prefix, xd))
            t0 = time.perf_counter()
            r = jax.block_until_ready(f(net, xd))
            t = time.perf_counter() - t0
            active, found = np.asarray(r.active_per_layer).astype(np.int64), r.categories()
            del r  # 60000 x 65536 features: the device holds no more than one call's worth
            t = min([t] + [time_once(f, net, xd) for _ in range(stream_trials - 1)])
        else:
            # Called directly, not under an outer jit: SparseDNN places its packed operands
            # on the device once (per option set) and passes them as arguments.
            f = lambda net, x: net(x)  # noqa: E731
            t0 = time.perf_counter()
            r = jax.block_until_ready(f(net, xd))
            first_s = time.perf_counter() - t0  # packing, placing, compiling and one call
            active, found = np.asarray(r.active_per_layer).astype(np.int64), r.categories()
            t = time_fn(f, net, xd, trials=7, min_time=0.3)
        rows_in = np.concatenate([[np.count_nonzero(np.diff(x.indptr))], active[:-1]])
        floor_bytes = float(np.sum((rows_in + active) * n * itemsize))
        floor_s = floor_bytes / bw if bw else float("nan")
        label = jnp.dtype(dtype).name
        if chunk_layers:
            make_s = _make_seconds(net, chunk_layers, jnp.dtype(dtype))
            label += (
                f", streamed in chunks of {chunk_layers} layers made on the device "
                f"({make_s:.2f} s of the time)"
            )
        elif len(variants) > 1 or kernel != "auto":
            label += f", {kernel} kernel" + (f", segments {segments}" if segments else "")
        rows.append(
            {
                "problem": f"{n}-{n_layers}",
                "method": f"jax_spdnn {'stream_network' if chunk_layers else 'SparseDNN'} "
                f"({label})",
                "s": t,
                "TE/s": edges / t / 1e12,
                "floor_s": floor_s,
                "pct_floor": 100 * floor_s / t,
                "survivors": int(found.size),
                "check": truth(found),
                "gen_s": gen_s,
                **({} if chunk_layers else {"first_call_s": first_s}),
            }
        )
        print(rows[-1], flush=True)
    os.environ.pop("SPDNN_DNN_KERNEL", None)
    os.environ.pop("SPDNN_DNN_SEGMENTS", None)
    if peers:
        from jax.experimental import sparse as jsparse

        jax.config.update("jax_bcoo_cusparse_lowering", True)
        wts = [
            jsparse.BCSR.from_scipy_sparse(W.to_scipy().T.tocsr().astype(np.float32))
            for W in layers
        ]

        # Weights are arguments, not constants captured by the trace: at 1024-1920 the
        # dense bf16 weights alone are 4 GB.
        @jax.jit
        def cusparse(wts, x):
            for wt in wts:
                x = jnp.clip((wt @ x.T).T + bias, 0.0, 32.0)
            return x

        xs = jnp.asarray(x.toarray(), jnp.float32)

        def peer(name, fn, weights):
            y = jax.block_until_ready(fn(weights, xs))
            t = time_fn(fn, weights, xs, trials=1, min_time=0.0)
            found = np.flatnonzero(np.asarray(jnp.any(y != 0, axis=1)))
            rows.append(
                {
                    "problem": f"{n}-{n_layers}",
                    "method": name,
                    "s": t,
                    "TE/s": edges / t / 1e12,
                    "pct_floor": 100 * floor_s / t,
                    "survivors": int(found.size),
                    "check": truth(found),
                }
            )
            print(rows[-1], flush=True)

        peer("BCSR (cuSPARSE) + clamp per layer", cusparse, wts)
        del wts
        if n * n * 2 * n_layers <= 16 * 2**30:  # dense bf16 weights up to 16 GB
            wds = [jnp.asarray(W.to_scipy().toarray(), jnp.bfloat16) for W in layers]

            @jax.jit
            def dense(wds, x):
                for wd in wds:
                    z = jnp.dot(x.astype(jnp.bfloat16), wd, preferred_element_type=jnp.float32)
                    x = jnp.clip(z + bias, 0.0, 32.0)
                return x

            peer("dense XLA bf16 per layer", dense, wds)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--problems", nargs="+", default=["1024-120", "4096-120"])
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--peers", action="store_true", help="run the peers on a CPU too")
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        help="CUDA kernels of SparseDNN to time: auto, footprint, layer, resident",
    )
    p.add_argument(
        "--segments",
        nargs="+",
        default=[None],
        help="resident-kernel schedules 'singles,max' to time (default: the built-in one)",
    )
    p.add_argument(
        "--chunk-layers",
        type=int,
        default=-1,
        help="time stream_network in chunks of K layers, each made on the device just before "
        "it runs (challenge.RadixNetLayers; no peers); 0: SparseDNN whatever the size; "
        f"default: chunks of 120 for networks of more than {STREAM_NNZ:.2e} nonzeros "
        "(SparseDNN packs its operands into the compiled program) and SparseDNN below",
    )
    p.add_argument(
        "--stream-trials",
        type=int,
        default=3,
        help="timed calls when streaming (best kept; programs compiled on a short prefix)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference")
    p.add_argument(
        "--reference-device",
        choices=["cpu", "default"],
        default="cpu",
        help="where the float64 reference runs (default: JAX's default device, in row blocks)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = [
        (k, s)
        for k in args.kernels
        for s in (args.segments if k in ("auto", "resident") else [None])
    ]
    env = environment()
    on_gpu = env["platform"] not in ("cpu",)
    bw = copy_bandwidth() if on_gpu else None
    rows = []
    for prob in args.problems:
        n, n_layers = (int(v) for v in prob.split("-"))
        chunk_layers = args.chunk_layers
        if chunk_layers < 0:
            chunk_layers = 120 if ch.RadixNetLayers(n, n_layers).nnz > STREAM_NNZ else 0
        for i, dt in enumerate(args.dtypes):
            peers = (on_gpu or args.peers) and not args.no_peers and i == 0
            peers = peers and not chunk_layers
            rows += run_problem(
                n,
                n_layers,
                args.batch,
                bw,
                peers,
                jnp.dtype(dt),
                variants,
                chunk_layers,
                None if args.no_check else args.reference_device,
                args.stream_trials,
            )
    e = env
    print(
        f"\n{e['device']}, jax {e['jax']}, jaxlib {e['jaxlib']}, {e['date']}"
        + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
    )
    print("| problem | method | time s | TE/s | % of floor | survivors | truth check |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pf = (
            f"{r['pct_floor']:.1f}"
            if r.get("pct_floor") == r.get("pct_floor") and r.get("pct_floor") is not None
            else "-"
        )
        print(
            f"| {r['problem']} | {r['method']} | {r['s']:.4f} | {r['TE/s']:.2f} | {pf} | "
            f"{r['survivors']} | {r['check']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
