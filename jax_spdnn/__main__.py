"""Command line: ``python -m jax_spdnn [challenge] [options]``.

``challenge`` (the default) runs the Sparse DNN Graph Challenge: it loads the official files
(``--data DIR``) or generates a network with the RadiX-Net recipe and MNIST-like inputs from
scikit-learn's handwritten digits, runs whole-network inference as one compiled program on
whatever device JAX has, and prints the inference time (network and inputs already on the
device, as the challenge defines it), the edge rate and the truth check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _find(data: Path, *names: str) -> Path | None:
    for name in names:
        for p in (data / name, *data.glob(f"**/{name}")):
            if p.exists():
                return p
    return None


def _distributed_setup(net, x, dtype, rebalance, console):
    """Every process holds the same inputs and contributes its own share of the rows to a
    global array split over every device of every process (zero rows pad the batch to a
    multiple of the device count; they die at once)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_spdnn import distributed as dist

    mesh = dist.batch_mesh()
    n_dev, n_proc, pid = mesh.size, jax.process_count(), jax.process_index()
    batch = x.shape[0]
    padded = -(-batch // n_dev) * n_dev
    per_process = padded // n_proc
    lo = pid * per_process
    local = np.zeros((per_process, x.shape[1]), dtype=np.float32)
    hi = min(batch, lo + per_process)
    if hi > lo:
        local[: hi - lo] = x[lo:hi].toarray()
    xg = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("batch")), local.astype(dtype), (padded, x.shape[1])
    )
    console.print(
        f"distributed: {n_proc} processes, {n_dev} devices, {per_process} rows per process"
        + (f", rebalancing every {rebalance} layers" if rebalance else "")
    )
    return dist.shard(net, mesh, rebalance_every=rebalance or None), xg


def _gather_result(result, batch):
    """The global result on every process (rows trimmed to the batch)."""
    from jax.experimental import multihost_utils

    from jax_spdnn.dnn import DNNResult

    alive = np.asarray(multihost_utils.process_allgather(result.alive, tiled=True))[:batch]
    return DNNResult(None, alive, np.asarray(result.active_per_layer))


def _challenge(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import track
    from rich.table import Table

    import jax_spdnn as sd
    from jax_spdnn import challenge as ch

    console = Console()
    if args.distributed:
        from jax_spdnn import distributed as dist

        dist.initialize(args.coordinator, args.num_processes, args.process_id)
        if jax.process_index() != 0:  # one report and one truth check, from process 0
            console = Console(quiet=True)
            args.no_check = True
    dev = jax.local_devices()[0]
    n, n_layers = args.neurons, args.layers
    bias = ch.challenge_bias(n) if n in ch.CHALLENGE_BIAS else -0.3
    console.print(
        f"[bold]Sparse DNN Graph Challenge[/] N={n}, L={n_layers}, dtype={args.dtype}, "
        f"device={getattr(dev, 'device_kind', dev.platform)} "
        f"({escape(sd.cuda_status())})"
    )

    def progress(it, what):
        return track(it, description=what, console=console, transient=True)

    truth = None
    if args.data:
        data = Path(args.data)
        src = _find(data, f"neuron{n}.tar.gz", f"neuron{n}") or data
        layers = ch.read_layers(
            src, n, n_layers, progress=lambda it: progress(it, "reading layers")
        )
        images = _find(data, f"sparse-images-{n}.tsv")
        if images is None:
            console.print(f"[red]no sparse-images-{n}.tsv under {data}[/]")
            return 2
        x = ch.read_images(images, n, n_images=args.batch or 60000)
        cats = _find(data, f"neuron{n}-l{n_layers}-categories.tsv")
        if cats is not None:
            truth = (ch.read_categories(cats), np.zeros(0, np.int64), f"official {cats.name}")
    elif args.chunk_layers:  # layers made on the device while streaming, never all in memory
        batch = args.batch or 60000
        layers = ch.RadixNetLayers(n, n_layers, seed=args.seed)

        with console.status("generating MNIST-like inputs"):
            x = ch.digit_inputs(n, batch, seed=args.seed)
    else:
        batch = args.batch or 60000
        layers = [
            ch.radixnet_layer(n, k, seed=args.seed)
            for k in progress(range(1, n_layers + 1), "generating layers")
        ]
        with console.status("generating MNIST-like inputs"):
            x = ch.digit_inputs(n, batch, seed=args.seed)
    batch = x.shape[0]
    if args.chunk_layers:
        net = None

        def run(xd):
            return sd.stream_network(
                layers, xd, bias, n_layers=n_layers, clip=32.0, chunk_layers=args.chunk_layers
            )

        xd = jnp.asarray(x.toarray(), DTYPES[args.dtype])
    elif args.distributed:
        net = sd.SparseDNN(layers, bias, clip=32.0)
        run, xd = _distributed_setup(net, x, DTYPES[args.dtype], args.rebalance, console)
    else:
        net = sd.SparseDNN(layers, bias, clip=32.0)
        run, xd = net, jnp.asarray(x.toarray(), DTYPES[args.dtype])
    with console.status("compiling"):
        jax.block_until_ready(run(xd))
    t0 = time.perf_counter()
    result = jax.block_until_ready(run(xd))
    seconds = time.perf_counter() - t0
    if args.distributed:
        result = _gather_result(result, batch)
    edges = batch * (net.nnz if net is not None else layers.nnz)
    what = f"streamed in chunks of {args.chunk_layers} layers, " if args.chunk_layers else ""
    console.print(
        f"inference ({what}time per call): {seconds:.4f} s, {edges:.3e} edges, "
        f"[bold]{edges / seconds / 1e12:.3f} TE/s[/]"
    )
    found = result.categories()
    console.print(f"{found.size} of {batch} images have a nonzero final row")
    if truth is None and not args.no_check:
        with console.status("float64 reference (CPU)"):
            ref = ch.reference_inference_fast(
                layers,
                bias,
                x,
                clip=32.0,
                n_layers=n_layers,
                chunk_layers=args.chunk_layers or None,
            )
        truth = (ref.categories, ref.ambiguous, "float64 reference")
    status = 0
    if truth is not None:
        check = ch.check_categories(found, truth[0], truth[1])
        color = "green" if check.passed else "red"
        console.print(f"truth check against the {truth[2]}: [{color}]{check.summary()}[/]")
        status = 0 if check.passed else 1
    active = np.asarray(result.active_per_layer)
    layer_s = None
    if args.distributed and (args.profile or args.plot):
        console.print("[yellow]--profile/--plot run on one process only; skipped[/]")
        args.profile = args.plot = None
    if args.profile or args.plot:
        with console.status("timing the layers one by one"):
            prof_active, layer_s = net.profile_layers(xd)
        if not np.array_equal(prof_active, active):  # same kernels: same survivors
            console.print("[yellow]layer-by-layer run disagrees on active rows[/]")
    if args.profile:
        table = Table(
            "layer",
            "active rows",
            "ms (layer by layer)",
            title="per layer: active rows after it, time of its kernel on the rows entering it",
        )
        for k, (a, t) in enumerate(zip(active, layer_s), start=1):
            table.add_row(str(k), str(int(a)), f"{1e3 * t:.3f}")
        console.print(table)
        console.print(
            f"sum of per-layer times {layer_s.sum():.4f} s (one dispatch per layer) against "
            f"{seconds:.4f} s for the fused network"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        ax.plot(np.arange(1, n_layers + 1), active, marker=".")
        ax.set(
            ylabel="active rows",
            yscale="log",
            title=f"N={n}, L={n_layers}: per layer ({batch} inputs)",
        )
        ax2.plot(np.arange(1, n_layers + 1), 1e3 * layer_s, marker=".", color="C1")
        ax2.set(xlabel="layer", ylabel="ms (layer by layer)", yscale="log")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        console.print(f"saved {args.plot}")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_spdnn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    cmd = sub.add_parser("challenge", help="run the Graph Challenge (default)")
    for p in (parser, cmd):
        p.add_argument("--neurons", type=int, default=1024, help="neurons per layer N")
        p.add_argument("--layers", type=int, default=120, help="number of layers L")
        p.add_argument("--data", default=None, help="directory with the official files")
        p.add_argument("--batch", type=int, default=None, help="number of inputs (60000)")
        p.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default="float32",
            help="feature storage (accumulation is float32)",
        )
        p.add_argument("--seed", type=int, default=0, help="seed of the generated problem")
        p.add_argument(
            "--profile", action="store_true", help="print active rows and time per layer"
        )
        p.add_argument("--plot", default=None, help="save a plot of active rows and time per layer")
        p.add_argument("--no-check", action="store_true", help="skip the reference check")
        p.add_argument(
            "--distributed",
            action="store_true",
            help="join a multi-process run (jax.distributed) and split the rows over every "
            "device of every process",
        )
        p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
        p.add_argument("--num-processes", type=int, default=None)
        p.add_argument("--process-id", type=int, default=None)
        p.add_argument(
            "--rebalance", type=int, default=0, help="with --distributed: rebalance every K layers"
        )
        p.add_argument(
            "--chunk-layers",
            type=int,
            default=0,
            help="stream the generated network in chunks of K layers, each made on the "
            "device just before it runs (for weights beyond device memory)",
        )
    args = parser.parse_args(argv)
    if args.chunk_layers and (args.data or args.distributed or args.profile or args.plot):
        parser.error(
            "--chunk-layers streams a generated network on one process; it does not "
            "combine with --data, --distributed, --profile or --plot"
        )
    if args.chunk_layers < 0:
        parser.error("--chunk-layers must be positive")
    return _challenge(args)


if __name__ == "__main__":
    sys.exit(main())
