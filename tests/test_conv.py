"""sparse_conv2d against a float64 NumPy reference and lax.conv_general_dilated, on CPU and
(where present) CUDA: random geometry and sparsity, both layouts, dtypes, jit/vmap/grad,
pruning tools, and every argument error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads
from reference import conv2d_ref

import jax_spdnn as sd


def random_filter(rng, o, cg, kh, kw, density, dtype=np.float64):
    w = rng.standard_normal((o, cg, kh, kw))
    w[rng.random(w.shape) >= density] = 0.0
    return w.astype(dtype)


def to_nchw(a, layout):
    return np.transpose(a, (0, 3, 1, 2)) if layout == "NHWC" else a


def resolve_pads(padding, hw, k, strides, dilation):
    if isinstance(padding, str):
        window = [(kk - 1) * d + 1 for kk, d in zip(k, dilation)]
        return tuple(lax.padtype_to_pads(hw, window, strides, padding))
    return padding


def check_conv(y, x, w, strides, padding, dilation, groups, bias, activation, layout):
    xn = to_nchw(np.asarray(x).astype(np.float64), layout)
    pads = resolve_pads(padding, xn.shape[2:], w.shape[2:], strides, dilation)
    ref = conv2d_ref(xn, w, strides, pads, dilation, groups, bias, activation)
    mag = conv2d_ref(
        np.abs(xn),
        np.abs(w),
        strides,
        pads,
        dilation,
        groups,
        None if bias is None else np.abs(bias),
    )
    yn = to_nchw(np.asarray(y).astype(np.float64), layout)
    assert yn.shape == ref.shape, (yn.shape, ref.shape)
    eps = {np.float64: 1e-13, np.float32: 3e-6}.get(np.dtype(y.dtype).type, 1e-2)
    bound = eps * (mag + 1.0) * np.sqrt(max(w[0].size, 1))
    err = np.abs(yn - ref)
    assert np.all(err <= bound), f"max err {err.max():.3g} (bound {bound.max():.3g})"


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 5))
    og = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    batch = draw(st.sampled_from([0, 1, 2, 3, 5, 9]))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "VALID", "SAME_LOWER"]),
            st.tuples(
                st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
                st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
            ),
        )
    )
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    bias = draw(st.booleans())
    activation = draw(st.sampled_from([None, "relu"]))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        groups=groups,
        cg=cg,
        og=og,
        kh=kh,
        kw=kw,
        h=h,
        w=w,
        batch=batch,
        strides=strides,
        dilation=dilation,
        padding=padding,
        density=density,
        bias=bias,
        activation=activation,
        layout=layout,
        seed=seed,
    )


@given(case=conv_cases(), dtype=st.sampled_from([np.float32, np.float64]))
def test_matches_reference(device, case, dtype):
    c = case
    groups, cg, og, kh, kw = c["groups"], c["cg"], c["og"], c["kh"], c["kw"]
    h, w, batch, strides, dilation = c["h"], c["w"], c["batch"], c["strides"], c["dilation"]
    padding, density, has_bias = c["padding"], c["density"], c["bias"]
    activation, layout, seed = c["activation"], c["layout"], c["seed"]
    rng = np.random.default_rng(seed)
    o, c = og * groups, cg * groups
    wt = random_filter(rng, o, cg, kh, kw, density, dtype)
    K = sd.SparseConvKernel.from_oihw(wt)
    shape = (batch, c, h, w) if layout == "NCHW" else (batch, h, w, c)
    x = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype) if has_bias else None
    window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = resolve_pads(padding, (h, w), (kh, kw), strides, dilation)
    if any(n + lo + hi < win for n, (lo, hi), win in zip((h, w), pads, window)):
        return  # no output position (lax rejects it too)
    y = sd.sparse_conv2d(
        x,
        K,
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        activation=activation,
        layout=layout,
    )
    assert y.dtype == dtype
    check_conv(y, x, wt, strides, padding, dilation, groups, bias, activation, layout)
    # Same output shape as lax.conv_general_dilated.
    ref_shape = jax.eval_shape(
        lambda x: lax.conv_general_dilated(
            x,
            wt,
            strides,
            padding,
            rhs_dilation=dilation,
            feature_group_count=groups,
            dimension_numbers=(layout, "OIHW", layout),
        ),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
    ).shape
    assert y.shape == ref_shape


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_pruned_layer_sizes(device, layout, sparsity):
    """A realistic layer (batch not a multiple of the kernel's images per thread, channels
    not a multiple of its channel chunk) at sparsities from dense to empty."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((70, 24, 3, 3)).astype(np.float32)
    K = sd.SparseConvKernel.from_oihw(w, sparsity=sparsity)
    assert abs(K.sparsity - sparsity) < 1e-3
    x = rng.standard_normal((9, 24, 13, 13) if layout == "NCHW" else (9, 13, 13, 24))
    x = x.astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    y = jax.jit(
        lambda x, K: sd.sparse_conv2d(
            x, K, padding="SAME", bias=b, activation="relu", layout=layout
        )
    )(x, K)
    check_conv(y, x, np.asarray(K.todense()), (1, 1), "SAME", (1, 1), 1, b, "relu", layout)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_storage(device, dtype):
    rng = np.random.default_rng(3)
    w = random_filter(rng, 8, 6, 3, 3, 0.3, np.float32)
    K = sd.SparseConvKernel.from_oihw(w)
    x = jnp.asarray(rng.standard_normal((5, 6, 9, 9)), dtype)
    y = sd.sparse_conv2d(x, K, padding="SAME", activation="relu")
    assert y.dtype == dtype
    ref = conv2d_ref(
        np.asarray(x, np.float64), w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1, activation="relu"
    )
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_matches_lax_on_dense_filter(device):
    rng = np.random.default_rng(11)
    w = random_filter(rng, 12, 4, 3, 2, 0.4)
    K = sd.SparseConvKernel.from_oihw(w)
    x = rng.standard_normal((3, 8, 10, 9))
    kw = dict(padding=((2, 0), (1, 1)), dilation=(2, 1), groups=2)
    y = sd.sparse_conv2d(x, K, strides=(1, 2), **kw)
    ref = lax.conv_general_dilated(
        x,
        w,
        (1, 2),
        kw["padding"],
        rhs_dilation=(2, 1),
        feature_group_count=2,
        precision=lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


# -- transformations ---------------------------------------------------------------------------


def _layer(rng, o=6, c=4, k=3, density=0.5):
    w = random_filter(rng, o, c, k, k, density)
    return sd.SparseConvKernel.from_oihw(w), w


def test_jit_and_kernel_as_argument(device):
    rng = np.random.default_rng(0)
    K, w = _layer(rng)
    x = rng.standard_normal((2, 4, 7, 7))
    f = jax.jit(lambda x, K: sd.sparse_conv2d(x, K, strides=2, activation="relu"))
    y = f(x, K)
    np.testing.assert_allclose(y, sd.sparse_conv2d(x, K, strides=2, activation="relu"))
    y2 = f(x, K.with_values(2 * K.values))
    np.testing.assert_allclose(y2, 2 * y, rtol=1e-12)


def test_vmap(device):
    rng = np.random.default_rng(1)
    K, w = _layer(rng)
    xs = rng.standard_normal((3, 2, 4, 6, 5))
    f = lambda x, v: sd.sparse_conv2d(x, K.with_values(v), padding="VALID", bias=0.1)  # noqa: E731
    ys = jax.vmap(f, in_axes=(0, None))(xs, K.values)
    for i in range(3):
        np.testing.assert_allclose(ys[i], f(xs[i], K.values), rtol=1e-12)
    vs = np.stack([K.values, -K.values, 0.5 * K.values])
    ys = jax.vmap(f, in_axes=(None, 0))(xs[0], vs)
    for i in range(3):
        np.testing.assert_allclose(ys[i], f(xs[0], vs[i]), rtol=1e-12)
    ys = jax.vmap(f, in_axes=(1, 0))(np.moveaxis(xs, 0, 1), vs)
    for i in range(3):
        np.testing.assert_allclose(ys[i], f(xs[i], vs[i]), rtol=1e-12)
    # vmap over the bias
    g = lambda b: sd.sparse_conv2d(xs[0], K, bias=b)  # noqa: E731
    bs = rng.standard_normal((2, 6))
    ys = jax.vmap(g)(bs)
    np.testing.assert_allclose(ys[1], g(bs[1]), rtol=1e-12)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_grad(device, layout):
    rng = np.random.default_rng(2)
    K, w = _layer(rng, density=0.6)
    x = rng.standard_normal((2, 4, 7, 8) if layout == "NCHW" else (2, 7, 8, 4))
    b = rng.standard_normal(6)

    def f(x, v, b):
        return sd.sparse_conv2d(
            x,
            K.with_values(v),
            strides=(2, 1),
            padding="SAME",
            dilation=(1, 2),
            bias=b,
            activation="relu",
            layout=layout,
        )

    check_grads(f, (x, K.values, b), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    check_grads(f, (x, K.values, b), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_grad_matches_masked_dense(device):
    """The values' gradient equals the dense filter's gradient at the nonzeros."""
    rng = np.random.default_rng(4)
    K, w = _layer(rng, o=8, c=6, density=0.3)
    x = rng.standard_normal((3, 6, 9, 9))

    def sparse_loss(v):
        return jnp.sum(sd.sparse_conv2d(x, K.with_values(v), activation="relu") ** 2)

    def dense_loss(wd):
        y = lax.conv_general_dilated(x, wd, (1, 1), "SAME", precision=lax.Precision.HIGHEST)
        return jnp.sum(jnp.maximum(y, 0) ** 2)

    gs = jax.grad(sparse_loss)(K.values)
    gd = np.asarray(jax.grad(dense_loss)(w)).reshape(8, -1)
    rows = np.repeat(np.arange(8), np.diff(K.structure.indptr))
    np.testing.assert_allclose(gs, gd[rows, K.structure.indices], rtol=1e-10, atol=1e-10)


# -- the filter container and pruning ----------------------------------------------------------


def test_kernel_round_trips():
    rng = np.random.default_rng(5)
    w = random_filter(rng, 5, 3, 2, 4, 0.4)
    K = sd.SparseConvKernel.from_oihw(w)
    np.testing.assert_array_equal(K.todense(), w)
    np.testing.assert_array_equal(K.todense("HWIO"), np.transpose(w, (2, 3, 1, 0)))
    K2 = sd.SparseConvKernel.from_hwio(np.transpose(w, (2, 3, 1, 0)))
    assert K2.structure == K.structure
    np.testing.assert_array_equal(K2.values, K.values)
    assert K.nnz == np.count_nonzero(w)
    assert K.sparsity == pytest.approx(1 - np.count_nonzero(w) / w.size)
    leaves, tree = jax.tree_util.tree_flatten(K)
    assert len(leaves) == 1
    assert jax.tree_util.tree_unflatten(tree, leaves).shape == K.shape
    assert "SparseConvKernel" in repr(K)
    assert K.astype(np.float32).dtype == np.float32


def test_magnitude_pruning():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((16, 8, 3, 3))
    for s in (0.0, 0.5, 0.9, 0.97, 1.0):
        K = sd.SparseConvKernel.from_oihw(w, sparsity=s)
        assert K.nnz == w.size - round(s * w.size)
        if 0 < K.nnz < w.size:
            kept = np.abs(np.asarray(K.values)).min()
            dense = np.asarray(K.todense())
            assert np.abs(w[dense == 0]).max() <= kept
    K = sd.SparseConvKernel.from_oihw(w, threshold=1.0)
    assert K.nnz == np.count_nonzero(np.abs(w) > 1.0)


def test_prune_global():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((8, 4, 3, 3))
    b = 0.1 * rng.standard_normal((6, 8, 3, 3))  # small weights: pruned harder
    out = sd.prune_global({"a": a, "b": b}, 0.8)
    total = out["a"].nnz + out["b"].nnz
    assert abs(total - 0.2 * (a.size + b.size)) <= 1
    assert out["b"].sparsity > out["a"].sparsity
    hw = sd.prune_global([np.transpose(a, (2, 3, 1, 0))], 0.5, layout="HWIO")
    assert hw[0].structure == sd.SparseConvKernel.from_oihw(a, sparsity=0.5).structure
    assert sd.magnitude_threshold(a, 0.0) < 0
    with pytest.raises(ValueError, match="sparsity"):
        sd.magnitude_threshold(a, 1.5)
    with pytest.raises(ValueError, match="no filters"):
        sd.prune_global([], 0.5)
    with pytest.raises(ValueError, match="layout"):
        sd.prune_global([a], 0.5, layout="NCHW")


# -- errors ------------------------------------------------------------------------------------


def test_kernel_validation():
    with pytest.raises(ValueError, match="shape"):
        sd.SparseConvKernel([0, 0], [], [], (1, 2, 3))
    with pytest.raises(ValueError, match="out of range"):
        sd.SparseConvKernel([0, 1], [18], [1.0], (1, 2, 3, 3))
    with pytest.raises(ValueError, match="[Dd]uplicate"):
        sd.SparseConvKernel([0, 2], [3, 3], [1.0, 2.0], (1, 2, 3, 3))
    with pytest.raises(ValueError, match="finite"):
        sd.SparseConvKernel([0, 1], [3], [np.nan], (1, 2, 3, 3))
    with pytest.raises(ValueError, match="indptr"):
        sd.SparseConvKernel([0, 1, 1], [3], [1.0], (1, 2, 3, 3))
    with pytest.raises(ValueError, match="finite"):
        sd.SparseConvKernel.from_oihw(np.full((1, 1, 1, 1), np.inf))
    with pytest.raises(ValueError, match="4-D"):
        sd.SparseConvKernel.from_oihw(np.ones((2, 2)))
    with pytest.raises(ValueError, match="4-D"):
        sd.SparseConvKernel.from_hwio(np.ones((2, 2)))
    with pytest.raises(ValueError, match="either threshold or sparsity"):
        sd.SparseConvKernel.from_oihw(np.ones((1, 1, 1, 1)), threshold=0.1, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        sd.SparseConvKernel.from_oihw(np.ones((1, 1, 1, 1)), sparsity=-0.1)
    with pytest.raises(ValueError, match="layout"):
        sd.SparseConvKernel.from_oihw(np.ones((1, 1, 1, 1))).todense("NCHW")


def test_argument_errors():
    K = sd.SparseConvKernel.from_oihw(np.ones((4, 3, 3, 3)))
    x = np.ones((2, 3, 8, 8), np.float32)
    with pytest.raises(TypeError, match="SparseConvKernel"):
        sd.sparse_conv2d(x, np.ones((4, 3, 3, 3)))
    with pytest.raises(TypeError, match="rank 4"):
        sd.sparse_conv2d(x[0], K)
    with pytest.raises(TypeError, match="float32"):
        sd.sparse_conv2d(x.astype(np.int32), K)
    with pytest.raises(ValueError, match="do not match"):
        sd.sparse_conv2d(np.ones((2, 5, 8, 8)), K)
    with pytest.raises(ValueError, match="must divide the input channels"):
        sd.sparse_conv2d(x, K, groups=2)
    with pytest.raises(ValueError, match="must divide the output channels"):
        sd.sparse_conv2d(
            np.ones((2, 9, 8, 8)), sd.SparseConvKernel.from_oihw(np.ones((4, 1, 3, 3))), groups=9
        )
    with pytest.raises(ValueError, match="groups"):
        sd.sparse_conv2d(x, K, groups=0)
    with pytest.raises(ValueError, match="padding"):
        sd.sparse_conv2d(x, K, padding="FULL")
    with pytest.raises(TypeError, match="padding"):
        sd.sparse_conv2d(x, K, padding=3)
    with pytest.raises(ValueError, match="2 \\(low, high\\) pairs"):
        sd.sparse_conv2d(x, K, padding=((1, 1),))
    with pytest.raises(ValueError, match="strides"):
        sd.sparse_conv2d(x, K, strides=0)
    with pytest.raises(TypeError, match="dilation"):
        sd.sparse_conv2d(x, K, dilation="x")
    with pytest.raises(ValueError, match="layout"):
        sd.sparse_conv2d(x, K, layout="CHWN")
    with pytest.raises(ValueError, match="activation"):
        sd.sparse_conv2d(x, K, activation="gelu")
    with pytest.raises(ValueError, match="bias"):
        sd.sparse_conv2d(x, K, bias=np.ones(3))
    # NHWC checks the last axis for channels.
    with pytest.raises(ValueError, match="do not match"):
        sd.sparse_conv2d(x, K, layout="NHWC")


def test_cuda_launch_chunks_cover_the_batch():
    """Batches too large for one CUDA launch are split; every chunk fits the grid limit."""
    from jax_spdnn.conv import _CUDA_MAX_PIXEL_BLOCKS, _batch_chunks

    for batch, plane in [(0, 49), (1, 49), (64, 50176), (5000, 50176), (100000, 196), (7, 1)]:
        chunks = _batch_chunks(batch, plane)
        assert chunks[0][0] == 0 and chunks[-1][1] == batch
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(chunks, chunks[1:]))
        for a, b in chunks:
            assert -(-(-(-(b - a) // 4) * plane) // 256) <= _CUDA_MAX_PIXEL_BLOCKS
    assert len(_batch_chunks(5000, 50176)) > 1


@pytest.mark.parametrize(
    "shape, k, strides, pads, dilation, groups",
    [
        ((3, 4, 9, 11), (6, 4, 3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
        ((2, 6, 8, 7), (4, 3, 3, 2), (2, 1), ((2, 0), (0, 3)), (2, 1), 2),
        ((9, 2, 5, 5), (3, 2, 5, 5), (1, 2), ((0, 0), (4, 4)), (1, 1), 1),  # taps mostly apart
    ],
)
def test_cpu_kernel_sums_in_csr_order(shape, k, strides, pads, dilation, groups):
    """The CPU kernel sums each output's terms in CSR order in float32 (its blocked passes
    over nonzeros that reach different outputs included): equal, bit for bit, to a NumPy
    float32 sum in that order."""
    rng = np.random.default_rng(sum(shape) + sum(k))
    w = random_filter(rng, *k, density=0.7, dtype=np.float32)
    K = sd.SparseConvKernel.from_oihw(w)
    x = rng.standard_normal(shape).astype(np.float32)
    bias = rng.standard_normal(k[0]).astype(np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        y = np.asarray(
            sd.sparse_conv2d(
                x,
                K,
                strides=strides,
                padding=pads,
                dilation=dilation,
                groups=groups,
                bias=bias,
                activation="relu",
            )
        )
    (pt, pb), (pl, pr) = pads
    (sh, sw), (dh, dw) = strides, dilation
    o_n, cg, kh, kw = k
    xp = np.zeros((shape[0], shape[1], shape[2] + pt + pb, shape[3] + pl + pr), np.float32)
    xp[:, :, pt : pt + shape[2], pl : pl + shape[3]] = x
    oh_n = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow_n = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((shape[0], o_n, oh_n, ow_n), np.float32)
    vals = np.asarray(K.values, np.float32)
    indptr, taps = K.structure.indptr, K.structure.indices
    for o in range(o_n):
        for j in range(indptr[o], indptr[o + 1]):
            ci, r = divmod(int(taps[j]), kh * kw)
            ky, kx = divmod(r, kw)
            c = o // (o_n // groups) * cg + ci
            win = xp[:, c, ky * dh :: sh, kx * dw :: sw][:, :oh_n, :ow_n]
            acc[:, o] = acc[:, o] + vals[j] * win  # padding adds +-0: exact
    want = np.maximum(acc + bias[None, :, None, None], np.float32(0))
    assert y.shape == want.shape
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_tile_packing_rebuilds_the_filter(groups):
    """conv_tile_packing lists every nonzero once, under the (channel group, input channel,
    filter row) it names, with each output channel's nonzeros in CSR order."""
    from jax_spdnn.conv import TILE_CHANNELS, conv_tile_packing

    rng = np.random.default_rng(groups)
    for o, cg, kh, kw, density in [
        (21, 5, 3, 3, 0.3),
        (6, 4, 5, 5, 0.1),
        (48, 3, 1, 1, 1.0),
        (9, 2, 3, 1, 0.0),
    ]:
        o *= groups
        w = random_filter(rng, o, cg, kh, kw, density, np.float32)
        K = sd.SparseConvKernel.from_oihw(w)
        perm, codes, ptr = conv_tile_packing(K.structure, K.shape, groups)
        og = o // groups
        ngtg = -(-og // TILE_CHANNELS)
        assert ptr.shape == (groups * ngtg * cg * kh + 1,) and ptr[0] == 0 and ptr[-1] == K.nnz
        assert np.all(np.diff(ptr) >= 0)
        assert np.array_equal(np.sort(perm), np.arange(K.nnz))
        vals = np.asarray(K.values)[perm]
        rebuilt = np.zeros_like(w)
        order = {oc: [] for oc in range(o)}
        for k in range(ptr.size - 1):
            gt, rest = divmod(k, cg * kh)
            c, r = divmod(rest, kh)
            gi, gtl = divmod(gt, ngtg)
            for j in range(ptr[k], ptr[k + 1]):
                t, s = divmod(int(codes[j]), kw)
                oc = gi * og + gtl * TILE_CHANNELS + t
                assert gtl * TILE_CHANNELS + t < og
                assert rebuilt[oc, c, r, s] == 0
                rebuilt[oc, c, r, s] = vals[j]
                order[oc].append(perm[j])
        np.testing.assert_array_equal(rebuilt, w)
        for oc in range(o):
            assert order[oc] == sorted(order[oc])  # CSR order within each output channel


def test_tile_plan():
    """The tiled kernel's strip: 8 or 7 by the lanes each wastes; None where the rows staged
    for 32 strips exceed the kernel's stage."""
    from jax_spdnn.conv import tile_plan

    assert tile_plan(64, (14, 14), (3, 3), np.float32) == 7
    assert tile_plan(64, (14, 14), (3, 3), jnp.bfloat16) == 8
    assert tile_plan(64, (13, 13), (3, 3), np.float32) == 7
    assert tile_plan(64, (16, 16), (3, 3), np.float32) == 8
    assert tile_plan(64, (56, 56), (3, 3), np.float32) == 8
    assert tile_plan(0, (14, 14), (3, 3), np.float32) is None
    assert tile_plan(4, (300, 600), (3, 3), np.float32) is None  # rows 600+ wide
    assert tile_plan(256, (1, 1), (5, 5), np.float32) is None  # 32 images of one row each


TILED_CASES = [
    # (batch, c, h, w, o, kh, kw, pads, groups, density, dtype)
    (5, 70, 14, 14, 37, 3, 3, ((1, 1), (1, 1)), 1, 0.1, np.float32),  # chunks, O % 8 != 0
    (3, 24, 13, 13, 200, 3, 3, ((1, 1), (1, 1)), 2, 0.08, np.float32),  # groups, 4 warps idle
    (7, 9, 7, 7, 16, 3, 3, ((0, 2), (2, 0)), 1, 0.5, np.float32),  # images cross blocks
    (2, 6, 11, 30, 9, 5, 5, ((2, 2), (2, 2)), 3, 0.3, np.float32),
    (4, 17, 9, 10, 8, 1, 1, ((0, 0), (0, 0)), 1, 0.6, np.float32),
    (3, 8, 6, 21, 12, 3, 3, ((-1, 1), (1, -1)), 1, 1.0, np.float32),  # negative pads, dense
    (2, 40, 14, 14, 24, 3, 3, ((1, 1), (1, 1)), 1, 0.0, np.float32),  # no nonzeros
    (6, 33, 14, 14, 20, 3, 3, ((1, 1), (1, 1)), 1, 0.1, jnp.bfloat16),
    (6, 33, 14, 14, 20, 5, 5, ((2, 2), (2, 2)), 1, 0.1, np.float16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("case", TILED_CASES)
def test_tiled_kernel_matches_direct_and_reference(case, monkeypatch):
    """Where the CUDA tiled kernel (SPDNN_CONV_KERNEL=tiled) applies (stride 1, dilation 1,
    KW in {1, 3, 5}) it gives the direct kernel's results (both sum each output in CSR order)
    and the float64 reference's."""
    import jax_spdnn.conv as conv

    batch, c, h, wd, o, kh, kw, pads, groups, density, dtype = case
    rng = np.random.default_rng(batch * c + o)
    w = random_filter(rng, o, c // groups, kh, kw, density, np.float32)
    K = sd.SparseConvKernel.from_oihw(w)
    x = rng.standard_normal((batch, c, h, wd)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    xd = jax.device_put(jnp.asarray(x, dtype), jax.devices("cuda")[0])
    monkeypatch.setattr(conv, "CUDA_KERNEL", "tiled")
    assert (
        conv._tiled_ok(
            xd,
            K.shape,
            (1, 1),
            (1, 1),
            conv.conv_output_shape((h, wd), (kh, kw), (1, 1), pads, (1, 1)),
        )
        is not None
    )

    def run(kernel):
        monkeypatch.setattr(conv, "CUDA_KERNEL", kernel)
        jax.clear_caches()
        f = jax.jit(
            lambda a: sd.sparse_conv2d(
                a, K, padding=pads, groups=groups, bias=bias, activation="relu"
            )
        )
        return np.asarray(f(xd).astype(jnp.float32))

    tiled, direct = run("tiled"), run("direct")
    np.testing.assert_array_equal(tiled, direct)
    xr = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    check_conv(
        jnp.asarray(tiled, dtype),
        xr,
        w.astype(np.float64),
        (1, 1),
        pads,
        (1, 1),
        groups,
        bias,
        "relu",
        "NCHW",
    )


def test_conv_kernel_choice_is_checked(monkeypatch):
    """An unknown SPDNN_CONV_KERNEL is a clear error, not a silent fallback."""
    import jax_spdnn.conv as conv

    monkeypatch.setattr(conv, "CUDA_KERNEL", "fastest")
    x = jnp.zeros((1, 2, 5, 5), jnp.float32)
    with pytest.raises(ValueError, match="SPDNN_CONV_KERNEL must be one of"):
        conv._tiled_ok(x, (4, 2, 3, 3), (1, 1), (1, 1), (5, 5))
