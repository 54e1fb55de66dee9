"""Pruned CNN layers: sparse_conv2d side by side with XLA's dense convolution (cuDNN on GPU).

Layers: ``benchmarks/data/pruned_conv_layers.csv`` (AlexNet, VGG-16, ResNet-50 3x3, GoogLeNet
with their published sparsities: Han et al. 2015 and the SkimCaffe models).  Filters are
random normal weights magnitude-pruned to the published sparsity (a uniform random pattern);
inputs random normal.  Each method is timed as one application inside a compiled
``fori_loop`` whose next input depends on the previous output (no dispatch overhead, nothing
hoisted), in the same layout for everyone (NCHW against NCHW, NHWC against NHWC).  Peers:
dense ``lax.conv_general_dilated`` at ``Precision.HIGHEST`` (true float32), at default
precision (TF32 on Hopper) and in bfloat16.

    python benchmarks/bench_conv.py [--batch 64 128] [--layouts NCHW NHWC] [--layers REGEX]
                                    [--sweep] [--json out.json]

``--sweep`` times one layer per family over a range of sparsities to find where the sparse
kernel starts to win.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_fn, time_iterated  # noqa: E402

import jax_spdnn as sd  # noqa: E402

LAYERS_CSV = os.path.join(os.path.dirname(__file__), "data", "pruned_conv_layers.csv")
SWEEP_LAYERS = [
    "alexnet/conv3",
    "vgg16/conv4_2",
    "resnet50/res4a_branch2b",
    "googlenet/inception_4e/3x3",
]
SWEEP_SPARSITIES = [0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98]


def load_layers(pattern: str | None = None):
    with open(LAYERS_CSV) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        if pattern and not re.search(pattern, r["layer"]):
            continue
        sp = {k: float(r[k]) for k in ("sparsity_han2015", "sparsity_skimcaffe") if r[k]}
        out.append(
            dict(
                name=r["layer"],
                c=int(r["in_channels"]),
                o=int(r["out_channels"]),
                h=int(r["height"]),
                w=int(r["width"]),
                kh=int(r["kernel_h"]),
                kw=int(r["kernel_w"]),
                stride=int(r["stride"]),
                pad=int(r["padding"]),
                groups=int(r["groups"]),
                sparsity=sp,
            )
        )
    return out


def feed_back(x, y):
    """``x`` with one element nudged by ``0 * y[0...]``: the next step depends on this one."""
    return x.at[(0,) * x.ndim].add(y[(0,) * y.ndim].astype(x.dtype) * 0)


def make_inputs(layer, batch, layout, seed=0):
    rng = np.random.default_rng(seed)
    c, h, w = layer["c"], layer["h"], layer["w"]
    shape = (batch, c, h, w) if layout == "NCHW" else (batch, h, w, c)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    wd = rng.standard_normal(
        (layer["o"], c // layer["groups"], layer["kh"], layer["kw"]), dtype=np.float32
    )
    return x, wd


def dense_step(layer, layout, wd, precision, dtype):
    k = jnp.asarray(wd, dtype)
    pads = ((layer["pad"],) * 2,) * 2

    def step(x):
        y = lax.conv_general_dilated(
            x,
            k,
            (layer["stride"],) * 2,
            pads,
            feature_group_count=layer["groups"],
            dimension_numbers=(layout, "OIHW", layout),
            precision=precision,
        )
        return feed_back(x, y)

    return step


def sparse_step(layer, layout, K):
    pads = ((layer["pad"],) * 2,) * 2

    def step(x):
        y = sd.sparse_conv2d(
            x, K, strides=layer["stride"], padding=pads, groups=layer["groups"], layout=layout
        )
        return feed_back(x, y)

    return step


def useful_flops(layer, batch, sparsity):
    oh = (layer["h"] + 2 * layer["pad"] - layer["kh"]) // layer["stride"] + 1
    ow = (layer["w"] + 2 * layer["pad"] - layer["kw"]) // layer["stride"] + 1
    taps = (layer["c"] // layer["groups"]) * layer["kh"] * layer["kw"]
    dense = 2 * batch * layer["o"] * oh * ow * taps
    return dense * (1 - sparsity)


def run(layers, batches, layouts, peers, iters, sweep):
    on_gpu = jax.devices()[0].platform == "gpu"

    def timer(step, x):
        if on_gpu:  # kernels of 0.03-1 ms: repetitions inside one program
            return time_iterated(step, x, iters=iters, trials=3)
        # CPU: milliseconds per call, dispatch negligible; XLA's CPU convolution is
        # slower inside a loop than called alone, so time single calls for fairness;
        # 7 trials of >= 0.2 s each because a 2-core machine is noisy.
        return time_fn(jax.jit(step), x, trials=7, min_time=0.2)

    results, dense_cache = [], {}
    for layer in layers:
        cases = sorted(set(layer["sparsity"].values())) if not sweep else SWEEP_SPARSITIES
        for batch in batches:
            for layout in layouts:
                x, wd = make_inputs(layer, batch, layout)
                key = (layer["name"], batch, layout)
                if key not in dense_cache:
                    dense_cache[key] = {}
                    peer_list = [("fp32", lax.Precision.HIGHEST, jnp.float32)]
                    if on_gpu:
                        peer_list += [
                            ("tf32", lax.Precision.DEFAULT, jnp.float32),
                            ("bf16", lax.Precision.DEFAULT, jnp.bfloat16),
                        ]
                    for name, prec, dt in peer_list if peers else []:
                        xx = x.astype(dt)
                        dense_cache[key][name] = timer(dense_step(layer, layout, wd, prec, dt), xx)
                for sp in cases:
                    K = sd.SparseConvKernel.from_oihw(wd, sparsity=sp)
                    t = timer(sparse_step(layer, layout, K), x)
                    # Correctness against true-float32 dense on the pruned filter.
                    pads = ((layer["pad"],) * 2,) * 2
                    ys = sd.sparse_conv2d(
                        x,
                        K,
                        strides=layer["stride"],
                        padding=pads,
                        groups=layer["groups"],
                        layout=layout,
                    )
                    yd = lax.conv_general_dilated(
                        x,
                        K.todense(),
                        (layer["stride"],) * 2,
                        pads,
                        feature_group_count=layer["groups"],
                        dimension_numbers=(layout, "OIHW", layout),
                        precision=lax.Precision.HIGHEST,
                    )
                    err = float(jnp.max(jnp.abs(ys - yd)) / (jnp.max(jnp.abs(yd)) + 1e-30))
                    row = dict(
                        layer=layer["name"],
                        batch=batch,
                        layout=layout,
                        sparsity=sp,
                        ours_ms=1e3 * t,
                        tflops=useful_flops(layer, batch, sp) / t / 1e12,
                        rel_err=err,
                    )
                    for name, tp in dense_cache[key].items():
                        row[f"{name}_ms"] = 1e3 * tp
                        row[f"vs_{name}"] = tp / t
                    results.append(row)
                    print(json.dumps(row), flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"])
    p.add_argument("--layers", default=None, help="regular expression on the layer name")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--sweep", action="store_true", help="sparsity sweep, one layer per family")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    env = environment()
    print(json.dumps(env), flush=True)
    if a.sweep:
        layers = [lyr for lyr in load_layers() if lyr["name"] in SWEEP_LAYERS]
    else:
        layers = [lyr for lyr in load_layers(a.layers) if lyr["sparsity"]]
    res = run(layers, a.batch, a.layouts, not a.no_peers, a.iters, a.sweep)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
