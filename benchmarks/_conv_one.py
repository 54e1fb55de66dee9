import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
from bench_conv import load_layers, make_inputs
import jax_spdnn as sd
layer = load_layers("alexnet/conv3")[0]
x, wd = make_inputs(layer, 64, "NCHW")
K = sd.SparseConvKernel.from_oihw(wd, sparsity=0.931)
f = jax.jit(lambda x: sd.sparse_conv2d(x, K, padding=((1, 1), (1, 1))))
f(x).block_until_ready(); f(x).block_until_ready()
