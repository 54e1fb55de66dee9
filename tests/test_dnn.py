"""SparseDNN: whole-network inference equals the float64 reference (categories on every
unambiguous row, features to float32 tolerance), with and without dead-row skipping, on the
CPU and on CUDA; edge cases and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_spdnn as sd
from jax_spdnn.challenge import check_categories, radixnet, random_inputs, reference_inference


@pytest.fixture(scope="module")
def net_and_ref():
    layers = radixnet(1024, 24, seed=1)
    x = random_inputs(1024, 4000, seed=3)
    return sd.SparseDNN(layers, -0.3), x, reference_inference(layers, -0.3, x)


@pytest.mark.parametrize("drop", [True, False])
def test_matches_reference(device, net_and_ref, drop):
    net, x, ref = net_and_ref
    r = net(x, drop_dead_rows=drop)
    check = check_categories(r.categories(), ref.categories, ref.ambiguous)
    assert check.passed, check.summary()
    assert ref.ambiguous.size <= 5
    ok = np.setdiff1d(np.arange(x.shape[0]), ref.ambiguous)
    y = np.asarray(r.features)
    np.testing.assert_allclose(y[ok], ref.features.toarray()[ok], atol=1e-3, rtol=1e-4)
    act = np.asarray(r.active_per_layer)
    assert act.shape == (24,) and np.all(np.diff(act) <= 0)
    assert abs(int(act[-1]) - ref.categories.size) <= ref.ambiguous.size


def test_matches_sparse_linear_chain_exactly(device):
    """Same kernels, same summation order: the fused network equals the layer chain."""
    layers = radixnet(256, 12, seed=5)
    x = random_inputs(256, 203, seed=1)  # not a multiple of the row tile
    net = sd.SparseDNN(layers, -0.35)
    y = x
    for W in layers:
        y = sd.sparse_linear(y, W, -0.35, clip=32.0)
    np.testing.assert_array_equal(np.asarray(net(x).features), np.asarray(y))


def test_edge_cases(device):
    layers = radixnet(64, 6, seed=0)
    x = random_inputs(64, 50, seed=0)
    # every row dies at layer 1
    r = sd.SparseDNN(layers, -100.0)(x)
    assert not np.asarray(r.alive).any() and np.all(np.asarray(r.active_per_layer) == 0)
    # no row dies (positive bias: rows may not be skipped; auto-detected)
    net = sd.SparseDNN(layers, 0.5)
    assert not net.can_drop_dead_rows()
    r = net(np.zeros((7, 64), np.float32))
    assert np.asarray(r.alive).all() and np.all(np.asarray(r.active_per_layer) == 7)
    np.testing.assert_allclose(np.asarray(r.features)[0, 0], min(32.0, 0.5 * 2**6 - 0.5), rtol=1e-6)
    # batch 1 and an all-zero input row
    r = sd.SparseDNN(layers, -0.3)(np.zeros((1, 64), np.float32))
    assert not np.asarray(r.alive).any()
    # per-layer and per-neuron biases
    b = -0.3 * np.ones((6, 64))
    b[:, ::2] = -0.2
    ref = reference_inference(layers, list(b), x)
    got = sd.SparseDNN(layers, b)(x)
    assert check_categories(got.categories(), ref.categories, ref.ambiguous).passed


@pytest.mark.parametrize("dtype", [np.float64, jnp.bfloat16, jnp.float16])
def test_dtypes(device, dtype):
    layers = radixnet(256, 10, seed=2)
    x = random_inputs(256, 500, seed=4)
    ref = reference_inference(layers, -0.3, x)
    r = sd.SparseDNN(layers, -0.3)(jnp.asarray(x, dtype))
    assert r.features.dtype == jnp.dtype(dtype)
    check = check_categories(r.categories(), ref.categories, ref.ambiguous)
    if dtype == np.float64:
        assert check.passed, check.summary()
    else:  # half-precision storage: reported, not required to match
        print(f"{np.dtype(dtype).name} storage: {check.summary()}")


def test_jit_and_pytree():
    layers = radixnet(64, 3, seed=0)
    net = sd.SparseDNN(layers, -0.3)
    x = random_inputs(64, 20, seed=1)
    leaves = jax.tree_util.tree_leaves(net)
    assert len(leaves) == 4  # three layers' values and the biases
    r = jax.jit(lambda net, x: net(x))(net, x)
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(net(x).features))
    # dead-row skipping is still chosen under jit (decided when the network was built)
    assert net.can_drop_dead_rows()
    flat, tree = jax.tree_util.tree_flatten(net)
    assert jax.tree_util.tree_unflatten(tree, flat).can_drop_dead_rows()
    assert "layers=3" in repr(net)


def test_errors():
    layers = radixnet(64, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        sd.SparseDNN([], 0.0)
    with pytest.raises(TypeError, match="layer 1 is ndarray"):
        sd.SparseDNN([layers[0], np.eye(64)], 0.0)
    with pytest.raises(ValueError, match="square"):
        sd.SparseDNN([layers[0], radixnet(32, 1)[0]], 0.0)
    with pytest.raises(ValueError, match="biases must be"):
        sd.SparseDNN(layers, np.zeros(3))
    net = sd.SparseDNN(layers, -0.3)
    with pytest.raises(ValueError, match=r"x must be \[batch, 64\]"):
        net(np.zeros((2, 63), np.float32))
    with pytest.raises(TypeError, match="got int32"):
        net(np.zeros((2, 64), np.int32))


@pytest.mark.parametrize("bias", [-0.3, 0.05])
def test_profile_layers(device, bias):
    """Layer-by-layer profiling reports the fused run's active rows and a time per layer
    (rows are dropped only when biases allow it)."""
    net = sd.SparseDNN(radixnet(256, 6, seed=2), bias)
    x = random_inputs(256, 300, seed=5)
    x[::7] = 0.0
    active, seconds = net.profile_layers(x, repeats=1)
    np.testing.assert_array_equal(active, np.asarray(net(x).active_per_layer))
    assert seconds.shape == (6,) and np.all(seconds > 0)
    with pytest.raises(ValueError, match="must be"):
        net.profile_layers(x[:, :10])
