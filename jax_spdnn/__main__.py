"""Command line: ``python -m jax_spdnn [demo] [--neurons N] [--layers L] [--batch B]``.

``demo`` (the default) generates a Graph-Challenge-style sparse network (the
RadiX-Net recipe), runs a batch of random binary inputs through its layers as
one jitted program of fused ``sparse_linear`` layers on whatever device JAX
has, and prints the inference time, the edge rate and a summary of the result.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _demo(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import track

    import jax_spdnn as sd
    from jax_spdnn.challenge import challenge_bias, radixnet_layer, random_inputs

    console = Console()
    dev = jax.devices()[0]
    on_gpu = dev.platform not in ("cpu",)
    batch = args.batch or (60000 if on_gpu else 6000)
    n, n_layers = args.neurons, args.layers
    bias = challenge_bias(n) if n in sd.challenge.CHALLENGE_BIAS else -0.3
    console.print(
        f"[bold]jax_spdnn demo[/]: N={n}, L={n_layers}, batch={batch}, "
        f"device={getattr(dev, 'device_kind', dev.platform)} "
        f"({escape(sd._native.cuda_status())})"
    )
    layers = [
        radixnet_layer(n, l, seed=args.seed)
        for l in track(range(1, n_layers + 1), description="generating layers", console=console)
    ]
    x0 = jnp.asarray(random_inputs(n, batch, density=tuple(args.density), seed=args.seed))

    @jax.jit
    def infer(x, layers):
        for W in layers:
            x = sd.sparse_linear(x, W, bias, clip=32.0)
        return x

    t0 = time.perf_counter()
    y = jax.block_until_ready(infer(x0, layers))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = jax.block_until_ready(infer(x0, layers))
    t = time.perf_counter() - t0
    edges = batch * sum(W.nnz for W in layers)
    alive = np.flatnonzero(np.asarray(jnp.any(y != 0, axis=1)))
    console.print(f"compile + first run: {t_first:.2f} s")
    console.print(
        f"inference: {t * 1e3:.1f} ms for {edges:.3e} edges = [bold]{edges / t / 1e12:.3f} TE/s[/]"
    )
    console.print(
        f"result: {alive.size} of {batch} inputs have a nonzero final row; "
        f"sum of outputs {float(jnp.sum(y)):.6g}; max {float(jnp.max(y)):.4g}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_spdnn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run a generated sparse network (default)")
    for p in (parser, demo):
        p.add_argument("--neurons", type=int, default=1024, help="neurons per layer (16 * 2^k)")
        p.add_argument("--layers", type=int, default=120, help="number of layers")
        p.add_argument(
            "--batch", type=int, default=None, help="inputs (default 60000 on GPU, 6000 on CPU)"
        )
        p.add_argument(
            "--density",
            type=float,
            nargs=2,
            default=(0.15, 0.35),
            metavar=("LOW", "HIGH"),
            help="range of the fraction of input features set",
        )
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
