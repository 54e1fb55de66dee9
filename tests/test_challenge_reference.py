"""The float64 reference and the truth check: it agrees with a dense computation, it flags
rounding-dependent images, and sparse_linear matches it on every unambiguous image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_spdnn as sd
from jax_spdnn.challenge import (
    check_categories,
    radixnet,
    random_inputs,
    reference_inference,
    reference_inference_fast,
)


def _dense(layers, bias, x, clip=32.0):
    y = np.asarray(x, np.float64)
    for W in layers:
        y = np.minimum(np.maximum(y @ W.to_scipy().toarray() + bias, 0.0), clip)
    return y


def test_reference_matches_dense():
    layers = radixnet(256, 10, seed=4)
    x = random_inputs(256, 300, seed=2)
    r = reference_inference(layers, -0.3, x)
    np.testing.assert_allclose(r.features.toarray(), _dense(layers, -0.3, x), atol=1e-9)
    assert len(r.active_per_layer) == 10
    assert r.active_per_layer[-1] == r.categories.size


def test_exact_tie_is_ambiguous():
    """One input, one weight of 1/2, bias -0.5: pre-activation exactly 0 at x = 1."""
    W = sd.SparseMatrix.from_dense(np.array([[0.5]]))
    r = reference_inference([W], -0.5, np.array([[1.0], [3.0], [0.0]]), clip=None)
    np.testing.assert_array_equal(r.categories_lower, [1])
    np.testing.assert_array_equal(r.categories_upper, [0, 1])
    np.testing.assert_array_equal(r.ambiguous, [0])
    assert check_categories([0, 1], r.categories, r.ambiguous).passed
    assert check_categories([1], r.categories, r.ambiguous).passed
    assert not check_categories([], r.categories, r.ambiguous).passed


def test_unstable_fixed_point_is_ambiguous():
    """A uniform row at 0.3 with 32 weights of 1/16 and bias -0.3 maps to itself; rounding
    errors double every layer, so its category cannot be trusted to any float format."""
    n = 64
    layers = radixnet(n, 30, seed=0)
    x = np.full((2, n), 0.3)
    x[1] = 1.0  # grows to the clip: certainly alive
    r = reference_inference(layers, -0.3, x)
    np.testing.assert_array_equal(r.ambiguous, [0])
    assert 1 in r.categories_lower


def test_fast_reference_agrees():
    layers = radixnet(256, 12, seed=4)
    x = random_inputs(256, 400, seed=5)
    a = reference_inference(layers, -0.3, x)
    b = reference_inference_fast(layers, -0.3, x)
    np.testing.assert_array_equal(a.categories, b.categories)
    assert a.active_per_layer == b.active_per_layer
    np.testing.assert_allclose(a.features.toarray(), b.features.toarray(), atol=1e-12)
    # its bounds are at least as wide
    assert set(a.ambiguous) <= set(b.ambiguous)


def test_fast_reference_no_survivors():
    """Every row dies: empty categories and an all-zero [rows, n] feature matrix (only
    surviving rows are moved off the device)."""
    layers = radixnet(256, 3, seed=4)
    x = random_inputs(256, 50, seed=5)
    for batch_chunk in (None, 16):
        r = reference_inference_fast(layers, -100.0, x, batch_chunk=batch_chunk)
        assert r.categories.size == 0 and r.features.shape == (50, 256)
        assert r.features.nnz == 0 and r.active_per_layer == [0, 0, 0]


def test_check_categories_report():
    c = check_categories([1, 2, 9], [1, 2, 3], ambiguous=[7])
    assert not c.passed
    np.testing.assert_array_equal(c.missing, [3])
    np.testing.assert_array_equal(c.extra, [9])
    assert "FAILED" in c.summary() and "1 ambiguous" in c.summary()
    assert check_categories([1, 2, 3], [1, 2, 3]).summary().startswith("PASSED")


def test_reference_rejects_positive_bias():
    with pytest.raises(ValueError, match="biases must be <= 0"):
        reference_inference(radixnet(32, 1), 0.1, np.ones((1, 32)))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_sparse_linear_chain_matches_reference(device, dtype):
    """A generated N=1024, L=24 network: categories equal on every unambiguous image,
    features to float32 tolerance (bfloat16 storage: categories reported, not required)."""
    layers = radixnet(1024, 24, seed=1)
    x = random_inputs(1024, 1000, seed=0)
    r = reference_inference(layers, -0.3, x)

    @jax.jit
    def run(x):
        for W in layers:
            x = sd.sparse_linear(x, W, -0.3, clip=32.0)
        return x

    y = np.asarray(run(jnp.asarray(x, dtype)).astype(jnp.float32))
    found = np.flatnonzero(y.any(axis=1))
    check = check_categories(found, r.categories, r.ambiguous)
    assert r.ambiguous.size <= 5
    if dtype == np.float32:
        assert check.passed, check.summary()
        ok = np.setdiff1d(np.arange(1000), r.ambiguous)
        np.testing.assert_allclose(y[ok], r.features.toarray()[ok], atol=1e-3, rtol=1e-4)
    else:
        print(f"bfloat16 storage: {check.summary()}")


def test_fast_reference_streamed_equals_whole():
    """The streamed float64 reference (layers made on demand or on the device, chunks of
    layers) and the one run in blocks of rows give the same categories, bounds, features
    and active counts as the whole-network one."""
    from jax_spdnn.challenge import (
        RadixNetLayers,
        radixnet,
        radixnet_layer,
        random_inputs,
        reference_inference_fast,
    )

    n, L = 256, 9
    layers = radixnet(n, L, seed=2)
    x = random_inputs(n, 300, seed=4)
    whole = reference_inference_fast(layers, -0.3, x)
    variants = (
        (layers, dict(chunk_layers=4)),
        (lambda k: radixnet_layer(n, k + 1, seed=2), dict(batch_chunk=70)),
        (layers, dict(batch_chunk=128)),
        (RadixNetLayers(n, L, seed=2), dict(chunk_layers=4)),  # made on the device
    )
    for source, kw in variants:
        part = reference_inference_fast(source, -0.3, x, n_layers=L, **kw)
        for a, b in zip(
            (part.categories, part.categories_lower, part.categories_upper, part.ambiguous),
            (whole.categories, whole.categories_lower, whole.categories_upper, whole.ambiguous),
        ):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(part.features.toarray(), whole.features.toarray())
        assert part.active_per_layer == whole.active_per_layer
