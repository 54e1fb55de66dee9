"""The Flax layer: same outputs and gradients as nn.Conv with the masked dense filter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")

import jax_spdnn as sd  # noqa: E402
from jax_spdnn.flax import SparseConv  # noqa: E402


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_matches_masked_dense_conv(device, layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9, 9, 6) if layout == "NHWC" else (4, 6, 9, 9))
    dense = nn.Conv(8, (3, 3), strides=2, padding="SAME", precision="highest")
    xh = x if layout == "NHWC" else np.transpose(x, (0, 2, 3, 1))
    p = dense.init(jax.random.key(0), xh)["params"]
    K = sd.SparseConvKernel.from_hwio(p["kernel"], sparsity=0.8)
    masked = {"kernel": K.todense("HWIO"), "bias": p["bias"]}
    layer = SparseConv.from_kernel(K, strides=2, padding="SAME", layout=layout)
    params = layer.init(jax.random.key(1), x)["params"]
    np.testing.assert_array_equal(params["values"], K.values)
    params = {"values": params["values"], "bias": p["bias"]}
    y = jax.jit(layer.apply)({"params": params}, x)
    y_ref = dense.apply({"params": masked}, xh)
    if layout == "NCHW":
        y_ref = jnp.transpose(y_ref, (0, 3, 1, 2))
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)

    # Gradients of a loss: the values' gradient is the dense kernel's at the nonzeros.
    def loss_sparse(params):
        return jnp.sum(jnp.tanh(layer.apply({"params": params}, x)))

    def loss_dense(params):
        y = dense.apply({"params": params}, xh)
        return jnp.sum(jnp.tanh(y))

    gs = jax.grad(loss_sparse)(params)
    gd = jax.grad(loss_dense)(masked)
    gk = np.transpose(np.asarray(gd["kernel"]), (3, 2, 0, 1)).reshape(8, -1)
    rows = np.repeat(np.arange(8), np.diff(K.structure.indptr))
    np.testing.assert_allclose(gs["values"], gk[rows, K.structure.indices], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gs["bias"], gd["bias"], rtol=1e-9, atol=1e-9)


def test_default_init_and_relu():
    K = sd.SparseConvKernel.from_oihw(np.ones((4, 3, 3, 3)), sparsity=0.5)
    layer = SparseConv(K.structure, K.shape, activation="relu", use_bias=False)
    x = jnp.ones((2, 5, 5, 3))
    params = layer.init(jax.random.key(0), x)
    assert set(params["params"]) == {"values"}
    assert params["params"]["values"].shape == (K.nnz,)
    assert float(jnp.min(layer.apply(params, x))) >= 0.0
