"""sparse_linear against the float64 reference, on CPU and (where present) CUDA:
random shapes and sparsity, dtypes, jit/vmap/grad, and every argument error."""

import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sps
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads
from reference import assert_matches_ref, random_sparse, sparse_linear_ref

import jax_spdnn as sd
from jax_spdnn.challenge import radixnet_layer

DTYPES = [np.float32, np.float64, jnp.bfloat16, jnp.float16]


@st.composite
def layer_cases(draw):
    n_in = draw(st.integers(1, 130))
    n_out = draw(st.integers(1, 130))
    batch = draw(st.sampled_from([0, 1, 2, 7, 8, 9, 33]))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    empty_rows = draw(st.sampled_from([0.0, 0.3]))
    bias = draw(st.sampled_from(["none", "scalar", "vector"]))
    activation = draw(st.sampled_from(["relu", None]))
    clip = draw(st.sampled_from([None, 0.5, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_in, n_out, batch, density, empty_rows, bias, activation, clip, seed


@given(case=layer_cases(), dtype=st.sampled_from([np.float32, np.float64]))
def test_matches_reference(device, case, dtype):
    n_in, n_out, batch, density, empty_rows, bias_kind, activation, clip, seed = case
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n_in, n_out, density, empty_rows=empty_rows)
    W = sd.SparseMatrix.from_scipy(w, dtype=dtype)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    bias = {
        "none": None,
        "scalar": np.asarray(rng.standard_normal(), dtype),
        "vector": rng.standard_normal(n_out).astype(dtype),
    }[bias_kind]
    y = sd.sparse_linear(x, W, bias, activation=activation, clip=clip)
    assert y.dtype == dtype and y.shape == (batch, n_out)
    b_ref = None if bias is None else np.broadcast_to(bias, (n_out,)).astype(np.float64)
    assert_matches_ref(y, x, W.to_scipy().astype(np.float64), b_ref, activation, clip)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "n_in,n_out,batch",
    [
        (1, 1, 1),
        (31, 33, 1),
        (100, 257, 13),
        (2000, 70, 11),
        (5000, 90, 9),
        (777, 1100, 17),
        (64, 520, 9),
    ],
)
def test_shapes_and_dtypes(device, rng, dtype, n_in, n_out, batch):
    """Tile edges: sizes not multiples of 8/32/256, input chunking (n_in=2000, 5000),
    several output groups per block (n_out=1100, 520)."""
    w = random_sparse(rng, n_in, n_out, min(1.0, 20 / n_in), empty_rows=0.1)
    W = sd.SparseMatrix.from_scipy(w)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    b = rng.standard_normal(n_out).astype(np.float32)
    y = jax.jit(lambda x, W: sd.sparse_linear(x, W, b, clip=2.0))(x, W)
    assert y.dtype == jnp.dtype(dtype)
    assert_matches_ref(y, x, W.to_scipy().astype(np.float64), b.astype(np.float64), "relu", 2.0)


def test_leading_dims_and_rank1(device, rng):
    w = random_sparse(rng, 40, 30, 0.2)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    y = sd.sparse_linear(x, W)
    assert y.shape == (3, 4, 30)
    assert_matches_ref(y, x, w)
    y1 = sd.sparse_linear(x[0, 0], W)
    assert y1.shape == (30,)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y[0, 0]))


def test_values_at_clip_and_zero(device):
    """Exactly representable sums: outputs equal to 0 and to clip come out exact."""
    w = np.zeros((4, 3))
    w[0, 0] = w[1, 0] = 1.0  # output 0 = x0 + x1
    w[2, 1] = 1.0  # output 1 = x2
    w[3, 2] = -1.0  # output 2 = -x3
    W = sd.SparseMatrix.from_dense(w, dtype=np.float32)
    x = np.array(
        [[16.0, 16.0, 0.0, 0.0], [1.0, 1.0, 32.0, 5.0], [40.0, 0.0, 31.5, -2.0]], np.float32
    )
    y = np.asarray(sd.sparse_linear(x, W, clip=32.0))
    np.testing.assert_array_equal(y, [[32.0, 0.0, 0.0], [2.0, 32.0, 0.0], [32.0, 31.5, 2.0]])


def test_no_activation_clip_only(device, rng):
    w = random_sparse(rng, 20, 10, 0.3)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float64)
    x = rng.standard_normal((5, 20))
    y = sd.sparse_linear(x, W, activation=None, clip=0.1)
    assert_matches_ref(y, x, w, None, None, 0.1)
    assert np.any(np.asarray(y) < 0)


def test_deterministic(device, rng):
    w = random_sparse(rng, 600, 700, 0.05)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    x = rng.standard_normal((50, 600)).astype(np.float32)
    f = jax.jit(lambda x: sd.sparse_linear(x, W, activation=None))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(f(x)))


def test_nan_propagates(device):
    W = sd.SparseMatrix.from_dense(np.eye(3), dtype=np.float32)
    x = np.array([[np.nan, -1.0, 50.0]], np.float32)
    y = np.asarray(sd.sparse_linear(x, W, clip=32.0))
    assert np.isnan(y[0, 0]) and y[0, 1] == 0.0 and y[0, 2] == 32.0


def test_empty_matrix(device, rng):
    W = sd.SparseMatrix(
        np.zeros(6, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), (7, 5)
    )
    x = rng.standard_normal((4, 7)).astype(np.float32)
    y = sd.sparse_linear(x, W, np.arange(5, dtype=np.float32) - 2.0)
    np.testing.assert_array_equal(np.asarray(y), np.tile([0.0, 0.0, 0.0, 1.0, 2.0], (4, 1)))


# -- transformations -------------------------------------------------------------


def _layer(rng, n_in=24, n_out=18, density=0.3, dtype=np.float64):
    w = random_sparse(rng, n_in, n_out, density)
    return w, sd.SparseMatrix.from_scipy(w, dtype=dtype)


def test_vmap_features(device, rng):
    w, W = _layer(rng, dtype=np.float32)
    x = rng.standard_normal((6, 5, 24)).astype(np.float32)
    y = jax.vmap(lambda xi: sd.sparse_linear(xi, W), in_axes=1, out_axes=2)(x)
    assert y.shape == (6, 18, 5)
    assert_matches_ref(jnp.moveaxis(y, 2, 1), x, w)


@pytest.mark.parametrize("x_axis", [None, 0, 1])
@pytest.mark.parametrize("b_axis", [None, 0])
def test_vmap_weights(device, rng, x_axis, b_axis):
    w, W = _layer(rng)
    k = 4
    vals = rng.standard_normal((k, W.nnz))
    bias = rng.standard_normal((k, 18)) if b_axis == 0 else rng.standard_normal(18)
    x = rng.standard_normal((k, 3, 24) if x_axis == 0 else (3, k, 24) if x_axis == 1 else (3, 24))

    def f(xi, v, b):
        return sd.sparse_linear(xi, W.with_values(v), b, clip=1.0)

    y = jax.vmap(f, in_axes=(x_axis, 0, b_axis))(x, vals, bias)
    assert y.shape == (k, 3, 18)
    for i in range(k):
        xi = x if x_axis is None else np.take(x, i, axis=x_axis)
        bi = bias[i] if b_axis == 0 else bias
        wi = W.with_values(vals[i]).to_scipy()
        assert_matches_ref(y[i], xi, wi, bi, "relu", 1.0)


def test_nested_vmap_and_jit(device, rng):
    w, W = _layer(rng)
    vals = rng.standard_normal((2, 3, W.nnz))
    x = rng.standard_normal((5, 24))
    f = jax.jit(jax.vmap(jax.vmap(lambda v: sd.sparse_linear(x, W.with_values(v)))))
    y = f(vals)
    assert y.shape == (2, 3, 5, 18)
    assert_matches_ref(y[1, 2], x, W.with_values(vals[1, 2]).to_scipy())


@pytest.mark.parametrize(
    "activation,clip", [(None, None), ("relu", None), ("relu", 0.7), (None, 0.7)]
)
def test_grads(device, rng, activation, clip):
    _, W = _layer(rng)
    x = rng.standard_normal((5, 24))
    b = rng.standard_normal(18) * 0.1

    def f(x, v, b):
        return sd.sparse_linear(x, W.with_values(v), b, activation=activation, clip=clip)

    order = 2 if activation is None and clip is None else 1
    check_grads(
        f, (x, W.values, b), order=order, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5, eps=1e-6
    )


def test_grad_matches_dense(device, rng):
    w, W = _layer(rng, 40, 30, 0.2)
    x = rng.standard_normal((7, 40))
    b = rng.standard_normal(30) * 0.1
    rows, cols = W.indices, W.structure.row_ids

    def sparse_loss(x, v, b):
        return jnp.sum(sd.sparse_linear(x, W.with_values(v), b, clip=1.0) ** 2)

    def dense_loss(x, v, b):
        wd = jnp.zeros((40, 30)).at[rows, cols].set(v)
        return jnp.sum(jnp.minimum(jnp.maximum(x @ wd + b, 0), 1.0) ** 2)

    gs = jax.grad(sparse_loss, argnums=(0, 1, 2))(x, W.values, b)
    gd = jax.grad(dense_loss, argnums=(0, 1, 2))(x, W.values, b)
    for a, c in zip(gs, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-10, atol=1e-12)


def test_values_grad_in_chunks(device, rng, monkeypatch):
    """The values' cotangent is summed over row chunks for large batches: same result."""
    import jax_spdnn.linear as lin

    _, W = _layer(rng)
    x = rng.standard_normal((37, 24))

    def grad():
        return jax.grad(lambda v: sd.sparse_linear(x, W.with_values(v), activation=None).sum())(
            W.values
        )

    whole = np.asarray(grad())
    monkeypatch.setattr(lin, "_SDDMM_CHUNK_ELEMENTS", 5 * W.nnz)  # chunks of 5 rows
    np.testing.assert_allclose(np.asarray(grad()), whole, rtol=1e-12, atol=1e-12)


def test_grad_through_sparse_matrix_pytree(device, rng):
    _, W = _layer(rng)
    x = rng.standard_normal((5, 24))
    g = jax.grad(lambda W: sd.sparse_linear(x, W).sum())(W)
    assert isinstance(g, sd.SparseMatrix) and g.structure == W.structure
    gv = jax.grad(lambda v: sd.sparse_linear(x, W.with_values(v)).sum())(W.values)
    np.testing.assert_allclose(np.asarray(g.values), np.asarray(gv))


def test_linear_transpose(device, rng):
    w, W = _layer(rng)
    x = rng.standard_normal((5, 24))
    f = lambda x: sd.sparse_linear(x, W, activation=None)  # noqa: E731
    (xt,) = jax.linear_transpose(f, x)(jnp.ones((5, 18)))
    np.testing.assert_allclose(np.asarray(xt), np.ones((5, 18)) @ w.toarray().T, rtol=1e-12)


def test_half_precision_grad(device, rng):
    _, W = _layer(rng, dtype=np.float32)
    x = rng.standard_normal((5, 24)).astype(jnp.bfloat16)
    gx = jax.grad(lambda x: sd.sparse_linear(x, W).astype(jnp.float32).sum())(x)
    assert gx.dtype == jnp.bfloat16 and gx.shape == x.shape


# -- errors ------------------------------------------------------------------------


def test_errors(rng):
    _, W = _layer(rng, dtype=np.float32)
    x = np.ones((2, 24), np.float32)
    with pytest.raises(TypeError, match="SparseMatrix"):
        sd.sparse_linear(x, np.ones((24, 18)))
    with pytest.raises(TypeError, match="rank >= 1"):
        sd.sparse_linear(np.float32(1.0), W)
    with pytest.raises(ValueError, match="last dimension 23 does not match W's n_in 24"):
        sd.sparse_linear(np.ones((2, 23), np.float32), W)
    with pytest.raises(TypeError, match="float32, float64, bfloat16 or float16, got int32"):
        sd.sparse_linear(np.ones((2, 24), np.int32), W)
    with pytest.raises(
        ValueError, match=r"bias must be a scalar or have shape \(n_out,\) = \(18,\)"
    ):
        sd.sparse_linear(x, W, np.ones(17, np.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        sd.sparse_linear(x, W, activation="gelu")
    with pytest.raises(ValueError, match="clip must not be NaN"):
        sd.sparse_linear(x, W, clip=math.nan)
    with pytest.raises(ValueError, match="does not match W's n_in"):
        jax.jit(lambda x: sd.sparse_linear(x, W))(np.ones((2, 25), np.float32))


def test_kernel_errors_are_ffi_errors(device):
    """The FFI handler validates its buffers and reports errors instead of crashing."""
    target = "spdnn_sparse_linear_csr" if device.platform == "cpu" else "spdnn_sparse_linear_ell"
    x = jnp.ones((2, 4), jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    attrs = dict(activation=np.int32(1), clip=np.float64(np.inf))
    bad_ptr = jnp.zeros(7, jnp.int32)  # must be n_out + 1 (CSR) or n_slices + 1 (ELL)
    with pytest.raises(Exception, match="sparse_linear: inconsistent"):
        jax.block_until_ready(
            call(
                x,
                jnp.ones(32, jnp.float32),
                jnp.zeros(3, jnp.float32),
                bad_ptr,
                jnp.zeros(32, jnp.int32),
                **attrs,
            )
        )
    good_ptr = jnp.zeros(4 if device.platform == "cpu" else 2, jnp.int32)
    with pytest.raises(Exception, match="accumulation dtype"):
        jax.block_until_ready(
            call(
                x,
                jnp.ones(32, jnp.float64),
                jnp.zeros(3, jnp.float32),
                good_ptr,
                jnp.zeros(32, jnp.int32),
                **attrs,
            )
        )


def test_reference_self_check():
    """The test reference itself against scipy's product."""
    rng = np.random.default_rng(0)
    w = random_sparse(rng, 10, 8, 0.4)
    x = rng.standard_normal((3, 10))
    np.testing.assert_allclose(sparse_linear_ref(x, w, None, None, None), (w.T @ x.T).T)
    assert sps.issparse(w)


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
@pytest.mark.parametrize(
    "kernel, shape, activation, dtype, stationary_max, target",
    [
        ("footprint", (64, 64), "relu", "f32", None, "spdnn_sparse_dnn_footprint"),
        ("footprint", (64, 48), "relu", "f32", None, "spdnn_sparse_linear_ell"),  # not square
        ("footprint", (64, 64), None, "f32", None, "spdnn_sparse_linear_ell"),  # no ReLU
        ("stationary", (64, 48), None, "f32", None, "spdnn_sparse_linear_stationary"),
        ("stationary", (64, 48), None, "f64", None, "spdnn_sparse_linear_ell"),  # float32 only
        ("auto", (64, 64), "relu", "f32", None, "spdnn_sparse_linear_stationary"),
        ("auto", (64, 64), "relu", "bf16", None, "spdnn_sparse_linear_stationary"),
        ("auto", (64, 64), "relu", "f64", None, "spdnn_sparse_linear_ell"),
        ("auto", "radixnet", "relu", "f32", None, "spdnn_sparse_linear_stationary"),
        ("layer", "radixnet", "relu", "f32", None, "spdnn_sparse_linear_ell"),
        # Beyond STATIONARY_AUTO_MAX_IN inputs:
        ("auto", (64, 64), "relu", "f32", 32, "spdnn_sparse_linear_ell"),  # below footprint N
        ("auto", "radixnet", "relu", "f32", 32, "spdnn_sparse_dnn_footprint"),  # footprints pay
        ("auto", "random", "relu", "f32", 32, "spdnn_sparse_linear_ell"),  # footprints do not
        ("auto", "radixnet", None, "f32", 32, "spdnn_sparse_linear_ell"),
    ],
)
def test_cuda_kernel_choice_lowers(
    kernel, shape, activation, dtype, stationary_max, target, monkeypatch
):
    """SPDNN_LINEAR_KERNEL=footprint lowers square ReLU layers to the footprint kernel (a
    one-layer network call), =stationary float32 layers to the stationary-rows kernel, and
    everything else to the layer kernel; auto takes the stationary kernel up to
    STATIONARY_AUTO_MAX_IN inputs and beyond it the footprint route for large layers whose
    footprints pay; on any machine with the CUDA kernels built."""
    import re

    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", kernel)
    if stationary_max is not None:
        monkeypatch.setattr(sd.linear, "STATIONARY_AUTO_MAX_IN", stationary_max)
    n = sd.linear.LINEAR_FOOTPRINT_MIN_N
    if shape == "radixnet":  # a generated challenge layer: groups of outputs share inputs
        W = radixnet_layer(n, 13)
    elif shape == "random":  # 32 random inputs per output: footprints as large as it gets
        rng = np.random.default_rng(0)
        rows, cols = rng.integers(0, n, n * 32), np.repeat(np.arange(n), 32)
        W = sd.SparseMatrix.from_scipy(
            sps.coo_matrix((np.ones(n * 32), (rows, cols)), (n, n)).tocsr()
        )
    else:
        W = sd.SparseMatrix.from_scipy(random_sparse(np.random.default_rng(0), *shape, 0.1))
    dt = {"f32": jnp.float32, "f64": jnp.float64, "bf16": jnp.bfloat16}[dtype]
    x = jax.ShapeDtypeStruct((3, 5, W.shape[0]), dt)
    f = jax.jit(lambda x: sd.sparse_linear(x, W, 0.1, activation=activation, clip=2.0))
    with jax.enable_x64(dtype == "f64"):
        text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"custom_call @(\w+)", text)) == {target}


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("kernel", ["layer", "stationary"])
@given(case=layer_cases(), dtype=st.sampled_from([np.float32, jnp.bfloat16, jnp.float16]))
def test_cuda_kernels_match_reference(kernel, case, dtype):
    """Each CUDA kernel on its own, on the random cases of test_matches_reference, with
    single- and half-precision features."""
    n_in, n_out, batch, density, empty_rows, bias_kind, activation, clip, seed = case
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n_in, n_out, density, empty_rows=empty_rows)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(np.float32) if bias_kind == "vector" else None
    # hypothesis runs many cases per test call: patch the environment per case.
    with mock.patch.dict(os.environ, {"SPDNN_LINEAR_KERNEL": kernel}):
        with jax.default_device(jax.devices("cuda")[0]):
            f = jax.jit(lambda x, W: sd.sparse_linear(x, W, bias, activation=activation, clip=clip))
            y = f(x, W)
    assert_matches_ref(y, x, W.to_scipy().astype(np.float64), bias, activation, clip)


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("rows_cap", ["1", "3", "15"])
@pytest.mark.parametrize("n", [31, 1000, 4097, 16384])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_stationary_tiles(n, rows_cap, dtype, monkeypatch):
    """The stationary kernel at every tile height it is built for (SPDNN_STAT_ROWS caps
    it), with batches that leave a partial last tile, inputs beyond 4096 (several output
    slices per warp), both staging forms (float32 copies, half precision widened) and
    infinite features that padding must not turn into NaN."""
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "stationary")
    monkeypatch.setenv("SPDNN_STAT_ROWS", rows_cap)
    rng = np.random.default_rng(n)
    n_out = n + 5
    w = random_sparse(rng, n, n_out, min(1.0, 24 / n), empty_rows=0.1)
    W = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    x = rng.standard_normal((23, n)).astype(dtype)
    x[0, : n // 3] = np.inf  # row 0: some outputs infinite, never NaN from padding
    b = rng.standard_normal(n_out).astype(np.float32)
    with jax.default_device(jax.devices("cuda")[0]):
        y = np.asarray(jax.jit(lambda x, W: sd.sparse_linear(x, W, b, clip=3.0))(x, W))
    with np.errstate(invalid="ignore"):  # the sparse product: inf meets only nonzeros
        z = w.T.tocsr().astype(np.float64) @ x[0].astype(np.float64) + b
        ref0 = np.where(z < 0, 0.0, z)  # comparisons keep NaN, like the kernels
        ref0 = np.where(ref0 > 3.0, 3.0, ref0)
    y0 = y[0].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(y0), np.isnan(ref0))
    ok = ~np.isnan(ref0)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y0[ok], ref0[ok], rtol=tol, atol=tol)
    assert_matches_ref(y[1:], x[1:], W.to_scipy().astype(np.float64), b, "relu", 3.0)


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
@pytest.mark.parametrize(
    "optin, n, route",
    [
        (227 * 1024, 16384, "stationary"),
        (163 * 1024, 8192, "stationary"),
        (163 * 1024, 16384, "layer"),
        (99 * 1024, 8192, "stationary"),
        (99 * 1024, 12288, "layer"),
    ],
)
def test_stationary_needs_three_rows(optin, n, route, monkeypatch):
    """auto takes the stationary kernel only where three feature rows fit the device's
    per-block shared memory (A100: 163 KB; consumer GPUs: 99 KB)."""
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "auto")
    monkeypatch.setattr(sd.linear, "_smem_optin", lambda: optin)
    rng = np.random.default_rng(0)
    W = sd.SparseMatrix.from_scipy(random_sparse(rng, n, 64, 4 / n))
    assert sd.linear.cuda_route(W.structure, 1, np.float32) == route


def test_smem_optin_default():
    """Without a CUDA device the limit is Hopper's (lowering for CUDA on a CPU machine)."""
    if not sd.cuda_available():
        assert sd.linear._smem_optin() == 227 * 1024
    else:
        assert sd.linear._smem_optin() >= 99 * 1024


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
def test_stationary_schedule_option(monkeypatch):
    """SPDNN_STAT_SCHEDULE=0 lowers the stationary kernel with the CSR-order packing (a
    different index constant), 1 (the default) with the bank-scheduled one; anything else
    is an error naming the variable."""
    rng = np.random.default_rng(3)
    W = sd.SparseMatrix.from_scipy(random_sparse(rng, 256, 64, 0.1))
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "stationary")
    x = jax.ShapeDtypeStruct((4, 256), jnp.float32)
    texts = {}
    for value in ("0", "1"):
        monkeypatch.setenv("SPDNN_STAT_SCHEDULE", value)
        f = jax.jit(lambda x: sd.sparse_linear(x, W))
        texts[value] = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
        assert sd.linear.stationary_schedule() is (value == "1")
    assert texts["0"] != texts["1"]
    assert not W.structure.stationary(False).scheduled and W.structure.stationary(True).scheduled
    monkeypatch.setenv("SPDNN_STAT_SCHEDULE", "yes")
    with pytest.raises(ValueError, match="SPDNN_STAT_SCHEDULE"):
        sd.linear.stationary_schedule()


def test_linear_kernel_option(monkeypatch):
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SPDNN_LINEAR_KERNEL"):
        sd.linear.linear_kernel()


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("lead", [(), (1,), (37,), (3, 70)])
@pytest.mark.parametrize("bias, clip", [(None, None), (-0.2, 1.5), ("vector", None)])
def test_footprint_route_equals_layer_kernel(lead, bias, clip, monkeypatch):
    """sparse_linear through the footprint kernel gives the layer kernel's results bit for
    bit (any leading shape, bias and clip), and its gradients."""
    rng = np.random.default_rng(len(lead))
    n = 700
    W = sd.SparseMatrix.from_scipy(random_sparse(rng, n, n, 0.02, empty_rows=0.1), dtype=np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias == "vector" else bias
    x = rng.standard_normal(lead + (n,)).astype(np.float32)
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        for kernel in ("layer", "footprint"):
            monkeypatch.setenv("SPDNN_LINEAR_KERNEL", kernel)
            f = jax.jit(lambda x, W: sd.sparse_linear(x, W, b, clip=clip))
            g = jax.jit(jax.grad(lambda x, W: jnp.sum(sd.sparse_linear(x, W, b, clip=clip) ** 2)))
            out[kernel] = (f(x, W), g(x, W))
    np.testing.assert_array_equal(np.asarray(out["footprint"][0]), np.asarray(out["layer"][0]))
    np.testing.assert_allclose(
        np.asarray(out["footprint"][1]), np.asarray(out["layer"][1]), rtol=1e-6, atol=1e-6
    )
