"""Scaling of sharded whole-network inference: 1, 2, 4, ... devices, with and without rebalancing.

For each generated challenge problem (RadiX-Net network, MNIST-like inputs) and each device
count d, the network runs through ``distributed.shard`` over the first d devices with the
inputs already split by rows (``NamedSharding``), so the time is inference only.  Reports
time, tera-edges/s, parallel efficiency against 1 device in the same run
(``t_1 / (d * t_d)``), the spread of surviving rows over devices, and whether the categories
equal the 1-device run.  ``--rebalance k`` adds runs that even out the surviving rows every
``k`` layers.

    python benchmarks/bench_sharded.py [--problems 16384-120 65536-120] [--devices 1 2 4]
                                       [--batch 60000] [--rebalance 10 30] [--json out.json]
    python benchmarks/bench_sharded.py --cpu-devices 4 --problems 1024-24 --batch 4000

``--cpu-devices n`` runs on n virtual CPU devices (a dry run of the harness on any machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--problems", nargs="+", default=["16384-120", "65536-120"])
    p.add_argument("--devices", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=60000)
    p.add_argument("--rebalance", type=int, nargs="*", default=[])
    p.add_argument("--cpu-devices", type=int, default=0)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument(
        "--chunk-layers",
        type=int,
        default=0,
        help="stream the network in chunks of K layers, each made on the devices just before "
        "it runs (stream_network over the mesh) instead of compiling the whole network",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax

    if a.cpu_devices:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
        jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(__file__))
    from common import environment, time_fn, time_once

    import jax_spdnn as sd
    from jax_spdnn import challenge as ch
    from jax_spdnn import distributed as dist

    env = environment()
    all_devices = jax.devices()
    counts = a.devices or [d for d in (1, 2, 4, 8) if d <= len(all_devices)]
    print(json.dumps(env), f"devices: {len(all_devices)}", flush=True)
    rows = []
    for prob in a.problems:
        n, n_layers = (int(v) for v in prob.split("-"))
        if a.chunk_layers:  # made on the devices chunk by chunk, never held whole
            layers = ch.RadixNetLayers(n, n_layers, seed=0)
        else:
            layers = ch.radixnet(n, n_layers, seed=0)
        bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
        net = sd.SparseDNN(layers, bias, clip=32.0) if not a.chunk_layers else None
        nnz = sum(W.nnz for W in layers) if net is not None else layers.nnz
        x_host = np.asarray(ch.digit_inputs(n, a.batch, seed=0).toarray(), np.float32)
        edges = a.batch * nnz
        base_t, base_cat = None, None
        for d in counts:
            if d > len(all_devices):
                print(f"skipping {d} devices: only {len(all_devices)}", flush=True)
                continue
            mesh = dist.batch_mesh(all_devices[:d])
            sharding = NamedSharding(mesh, P("batch"))
            pad = (-a.batch) % d
            x = jax.device_put(np.pad(x_host, ((0, pad), (0, 0))), sharding)
            if a.chunk_layers:

                def run(h, mesh=mesh, layers=layers, bias=bias):
                    return sd.stream_network(
                        layers, h, bias, clip=32.0, chunk_layers=a.chunk_layers, mesh=mesh
                    )

                r = run(x)
                alive = np.asarray(r.alive)
                spread = [int(v.sum()) for v in np.array_split(alive, d)]
            else:
                spread = np.asarray(
                    jax.jit(
                        jax.shard_map(
                            lambda h, net=net: net(h).alive.sum()[None],
                            mesh=mesh,
                            in_specs=P("batch"),
                            out_specs=P("batch"),
                        )
                    )(x)
                ).tolist()
            for every in [0, *([] if a.chunk_layers else a.rebalance)]:
                if not a.chunk_layers:
                    run = dist.shard(net, mesh, rebalance_every=every or None)
                r = jax.block_until_ready(run(x))
                if a.chunk_layers:  # long calls: best of --trials single calls
                    t = min(time_once(run, x) for _ in range(a.trials))
                else:
                    t = time_fn(run, x, trials=a.trials, min_time=0.0)
                cats = np.asarray(r.categories())
                cats = cats[cats < a.batch]
                if d == counts[0] and every == 0:
                    base_t, base_cat = t * d, cats
                row = {
                    "problem": prob,
                    "devices": d,
                    "rebalance_every": every,
                    "s": t,
                    "TE/s": edges / t / 1e12,
                    "efficiency": base_t / (d * t),
                    "survivors_per_device": spread,
                    "categories_equal_1_device": bool(np.array_equal(cats, base_cat)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del x
    print(f"\n{env['device']} x {len(all_devices)}, jax {env['jax']}, {env['date']}")
    print(
        "| problem | devices | rebalance | time s | TE/s | efficiency | survivors per device "
        "| categories = 1 device |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['problem']} | {r['devices']} | {r['rebalance_every'] or 'off'} | {r['s']:.4f} "
            f"| {r['TE/s']:.2f} | {100 * r['efficiency']:.0f}% | {r['survivors_per_device']} "
            f"| {r['categories_equal_1_device']} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    del jnp


if __name__ == "__main__":
    main()
