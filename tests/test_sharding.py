"""sparse_linear, sparse_conv2d and SparseDNN under jax.shard_map on four virtual CPU
devices: weights replicated, batch split; results and gradients equal the single-device
ones, and sharded inputs are not all-gathered."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import random_sparse

import jax_spdnn as sd
from jax_spdnn.challenge import radixnet, random_inputs


@pytest.fixture(autouse=True)
def _cpu_default():
    """The mesh is made of CPU devices: single-device references run on the CPU too (the
    same kernel, so results compare exactly even on a machine with a GPU)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (jax_num_cpu_devices)")
    return Mesh(np.array(devices[:4]), ("batch",))


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    W = sd.SparseMatrix.from_scipy(random_sparse(rng, 30, 20, 0.3))
    return W, rng.standard_normal((16, 30)), rng.standard_normal(20) * 0.1


def test_forward_and_no_all_gather(mesh):
    W, x, b = _layer()

    def f(x, W, b):
        return sd.sparse_linear(x, W, b, clip=1.0)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=P("batch")))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    y = g(xs, W, b)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x, W, b)))
    assert y.sharding.spec == P("batch")
    hlo = g.lower(xs, W, b).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo


def test_gradients_equal_single_device(mesh):
    """Replicated values and bias are made varying inside sparse_linear, so their
    cotangents are summed over the devices."""
    W, x, b = _layer(1)

    def f(x, v, b):
        return sd.sparse_linear(x, W.with_values(v), b, clip=1.0)

    def loss_sharded(x, v, b):
        g = jax.shard_map(f, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=P("batch"))
        return jnp.sum(g(x, v, b) ** 2)

    def loss(x, v, b):
        return jnp.sum(f(x, v, b) ** 2)

    gs = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2)))(x, W.values, b)
    g1 = jax.grad(loss, argnums=(0, 1, 2))(x, W.values, b)
    for a, c in zip(gs, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-12, atol=1e-12)


def test_sparse_dnn_sharded(mesh):
    """Uneven survival across devices; a batch split evenly by rows."""
    layers = radixnet(256, 10, seed=3)
    x = random_inputs(256, 400, seed=2)
    net = sd.SparseDNN(layers, -0.3)

    def run(x):
        r = net(x)
        return r.features, r.alive

    g = jax.jit(
        jax.shard_map(run, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P("batch")))
    )
    y, alive = g(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    ref = net(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref.features))
    np.testing.assert_array_equal(np.asarray(alive), np.asarray(ref.alive))


def _conv_layer(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4, 3, 3))
    w[rng.random(w.shape) < 0.7] = 0.0
    K = sd.SparseConvKernel.from_oihw(w)
    return K, rng.standard_normal((8, 7, 7, 4)), rng.standard_normal(6) * 0.1


def test_conv_sharded_forward_and_gradients(mesh):
    K, x, b = _conv_layer()

    def f(x, v, b):
        return sd.sparse_conv2d(
            x, K.with_values(v), strides=2, bias=b, activation="relu", layout="NHWC"
        )

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=P("batch")))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    y = g(xs, K.values, b)
    np.testing.assert_allclose(np.asarray(y), np.asarray(f(x, K.values, b)), rtol=1e-13)
    hlo = g.lower(xs, K.values, b).compile().as_text()
    assert "all-gather" not in hlo

    def loss_sharded(x, v, b):
        return jnp.sum(jnp.tanh(g(x, v, b)))

    def loss(x, v, b):
        return jnp.sum(jnp.tanh(f(x, v, b)))

    gs = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2)))(x, K.values, b)
    g1 = jax.grad(loss, argnums=(0, 1, 2))(x, K.values, b)
    for a, c in zip(gs, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-10, atol=1e-12)


def test_conv_shard_helper_uneven_batch_and_pmap(mesh):
    from jax_spdnn import distributed as dist

    K, x, b = _conv_layer(1)

    def f(h):
        return sd.sparse_conv2d(h, K, bias=b, activation="relu", layout="NHWC")

    g = dist.shard(f, mesh)
    np.testing.assert_allclose(np.asarray(g(x[:7])), np.asarray(f(x[:7])), rtol=1e-13)
    y = jax.pmap(f, devices=jax.devices("cpu")[:4])(x.reshape(4, 2, 7, 7, 4))
    np.testing.assert_allclose(np.asarray(y).reshape(8, 7, 7, 6), np.asarray(f(x)), rtol=1e-13)
