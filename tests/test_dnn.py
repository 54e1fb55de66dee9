"""SparseDNN: whole-network inference equals the float64 reference (categories on every
unambiguous row, features to float32 tolerance), with and without dead-row skipping, on the
CPU and on CUDA; edge cases and argument errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sps
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import random_sparse

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


@pytest.mark.parametrize("kernel", ["auto", "layer", "resident", "footprint"])
def test_matches_sparse_linear_chain(device, kernel, monkeypatch):
    """The fused network equals the chain of sparse_linear layers: bit for bit where both
    sum every output in input order (CPU; CUDA 'layer' and 'footprint'), to rounding with
    the hybrid path's resident kernel ('auto' at this width, 'resident'; same products,
    another order).  The chain runs on sparse_linear's layer kernel (input order; its
    default float32 kernel on CUDA, the stationary one, sums in a bank schedule's order)."""
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "layer")
    layers = radixnet(256, 12, seed=5)
    x = random_inputs(256, 203, seed=1)  # not a multiple of the row tile
    net = sd.SparseDNN(layers, -0.35)
    y = x
    for W in layers:
        y = sd.sparse_linear(y, W, -0.35, clip=32.0)
    got = np.asarray(net(x).features)
    if device.platform == "cpu" or kernel in ("layer", "footprint"):
        np.testing.assert_array_equal(got, np.asarray(y))
    else:
        np.testing.assert_allclose(got, np.asarray(y), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [64, 1024, 2048, 4096])
@pytest.mark.parametrize("kernel", ["resident", "layer", "footprint"])
def test_widths_and_kernels(device, n, kernel, monkeypatch):
    """Every width class of the resident kernel (1, 2, 4, 8 lane groups; every layer on it)
    and the layer kernel match the float64 reference; a batch that is not a multiple of any
    tile."""
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
    monkeypatch.setenv("SPDNN_DNN_SEGMENTS", "0,2")
    layers = radixnet(n, 5, seed=n)
    x = random_inputs(n, 77, seed=2)
    ref = reference_inference(layers, -0.3, x)
    for drop in (True, False):
        r = sd.SparseDNN(layers, -0.3)(x, drop_dead_rows=drop)
        check = check_categories(r.categories(), ref.categories, ref.ambiguous)
        assert check.passed, check.summary()
        ok = np.setdiff1d(np.arange(x.shape[0]), ref.ambiguous)
        np.testing.assert_allclose(
            np.asarray(r.features)[ok], ref.features.toarray()[ok], atol=1e-4, rtol=1e-5
        )
        act = np.asarray(r.active_per_layer)
        assert act.shape == (5,) and abs(int(act[-1]) - ref.categories.size) <= ref.ambiguous.size


@pytest.mark.parametrize("segments", ["0,1", "0,64", "2,4", "3,2", "12,1"])
def test_segment_schedules_agree(device, segments, monkeypatch):
    """How layers are split between the layer kernel and the resident kernel, and grouped
    into launches, changes nothing beyond rounding: rows dying inside a multi-layer
    segment, per-layer active counts, categories; and repeated runs are bit-identical."""
    layers = radixnet(1024, 12, seed=7)
    x = random_inputs(1024, 300, seed=5)
    ref = reference_inference(layers, -0.3, x)
    net = sd.SparseDNN(layers, -0.3)
    base = net(x)
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "resident")
    monkeypatch.setenv("SPDNN_DNN_SEGMENTS", segments)
    for drop in (True, False):
        r = net(x, drop_dead_rows=drop)
        check = check_categories(r.categories(), ref.categories, ref.ambiguous)
        assert check.passed, check.summary()
        np.testing.assert_allclose(
            np.asarray(r.features), np.asarray(base.features), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_array_equal(
            np.asarray(r.active_per_layer), np.asarray(base.active_per_layer)
        )
    again = net(x, drop_dead_rows=True)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(r.features))


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("kernel", ["layer", "footprint"])
def test_shared_memory_sizes_in_one_process(kernel, monkeypatch):
    """Widths whose staging needs different shared-memory sizes above 48 KB, one after the
    other in one process (a launch must not lower the kernel's limit below a size it cached
    for a later launch: 2048 then 2040 then 2047 failed that way)."""
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
    with jax.default_device(jax.devices("cuda")[0]):
        for n in (2048, 2040, 2047, 2049, 1500, 3000):
            rng = np.random.default_rng(n)
            w = sps.random(n, n, 0.003, random_state=rng, format="csc")
            net = sd.SparseDNN([sd.SparseMatrix.from_scipy(w)], -0.1)
            x = rng.random((5, n)).astype(np.float32)
            y = np.asarray(net(x, drop_dead_rows=False).features)
            want = np.minimum(np.maximum(x.astype(np.float64) @ w.toarray() - 0.1, 0), 32)
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 2600),
    n_layers=st.integers(1, 4),
    batch=st.integers(1, 70),
    density=st.sampled_from([0.002, 0.01, 0.05]),
    dup=st.integers(1, 16),
    drop=st.booleans(),
    group=st.sampled_from(["256", "512"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_footprint_kernel_equals_layer_kernel(n, n_layers, batch, density, dup, drop, group, seed):
    """Any sparsity pattern (uneven degrees, empty outputs, outputs sharing inputs, n and the
    batch not multiples of any tile): the footprint kernel gives the layer kernel's results
    bit for bit, and the active counts."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        base = sps.random(n, -(-n // dup), density, random_state=rng, format="csc")
        w = sps.hstack([base] * dup, format="csc")[:, rng.permutation(n)]
        w.data = rng.uniform(0.05, 0.6, w.data.shape)
        layers.append(sd.SparseMatrix.from_scipy(w))
    x = (rng.random((batch, n)) < 0.3).astype(np.float32) * rng.uniform(0, 2, (batch, n))
    net = sd.SparseDNN(layers, -0.1)
    results = {}
    with jax.default_device(jax.devices("cuda")[0]):
        for kernel, pipe, tail, tall in (
            ("layer", "1", "off", "off"),
            ("footprint", "1", "off", "off"),
            ("footprint", "0", "off", "off"),
            ("footprint", "1", "1,2", "off"),  # the stationary tail from layer 2 on
            ("footprint", "1", "0,2", "0"),  # from layer 0 (reading x), 32-row tiles
        ):
            env = dict(SPDNN_FP_GROUP=group, SPDNN_FP_PIPE=pipe, SPDNN_FP_TAIL=tail)
            os.environ.update(SPDNN_DNN_KERNEL=kernel, SPDNN_STAT_TALL=tall, **env)
            try:
                results[kernel, pipe, tail] = net(x.astype(np.float32), drop_dead_rows=drop)
            finally:
                for k in ("SPDNN_DNN_KERNEL", "SPDNN_FP_GROUP", "SPDNN_FP_PIPE", "SPDNN_FP_TAIL"):
                    del os.environ[k]
                del os.environ["SPDNN_STAT_TALL"]
    a = results["layer", "1", "off"]
    for key in (
        ("footprint", "1", "off"),
        ("footprint", "0", "off"),
        ("footprint", "1", "1,2"),
        ("footprint", "1", "0,2"),
    ):
        b = results[key]
        np.testing.assert_array_equal(np.asarray(b.features), np.asarray(a.features))
        np.testing.assert_array_equal(
            np.asarray(b.active_per_layer), np.asarray(a.active_per_layer)
        )
        # the footprint kernel reports the nonzero rows itself (the layer path reduces y)
        np.testing.assert_array_equal(np.asarray(b.alive), np.asarray(a.alive))
    np.testing.assert_array_equal(np.asarray(a.alive), np.any(np.asarray(a.features) != 0, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize(
    "n, degree, batch",
    [
        (4096, 32, 1000),  # weights in shared memory, one footprint chunk, runs of 8 tiles
        (4096, 48, 300),  # 12288 entries per group: weights read from global memory
        (3000, 3, 33),  # random inputs: footprints of ~700 columns, two chunks
        (5000, 40, 5),  # both, and one tile
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split", ["1", "2"])
def test_pipelined_footprint_kernel(n, degree, batch, dtype, split, monkeypatch):
    """The pipelined footprint kernel's paths (weights in shared or global memory,
    footprints in one or several chunks, runs of several row tiles or one; one or two
    threads per output; staging by 16-byte runs where a tile's rows are whole and by value
    elsewhere) give the plain footprint kernel's results bit for bit, in float32 and
    float64."""
    monkeypatch.setenv("SPDNN_FP_SPLIT", split)
    rng = np.random.default_rng(n + degree)
    layers = []
    for _ in range(3):
        rows = np.concatenate([rng.choice(n, degree, replace=False) for _ in range(n)])
        cols = np.repeat(np.arange(n), degree)
        vals = rng.uniform(0.5, 1.5, rows.size) * 4 / degree
        layers.append(sd.SparseMatrix.from_scipy(sps.csc_matrix((vals, (rows, cols)), (n, n))))
    x = (rng.random((batch, n)) < 0.2) * rng.uniform(0, 1, (batch, n))
    x[::3] = 0  # rows dead from the start
    net = sd.SparseDNN(layers, -0.2)
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        # plain kernel; pipelined; pipelined with one copy per staged value and per-row votes
        for name, pipe, lean in (("0", "0", "1"), ("1", "1", "1"), ("1-first", "1", "0")):
            monkeypatch.setenv("SPDNN_FP_PIPE", pipe)
            monkeypatch.setenv("SPDNN_FP_LEAN", lean)
            out[name] = net(x.astype(dtype))
    for name in ("1", "1-first"):
        np.testing.assert_array_equal(np.asarray(out[name].features), np.asarray(out["0"].features))
        np.testing.assert_array_equal(
            np.asarray(out[name].active_per_layer), np.asarray(out["0"].active_per_layer)
        )
    ref = reference_inference(layers, -0.2, x)
    assert np.asarray(out["1"].active_per_layer)[-1] == batch - len(range(0, batch, 3))
    check = check_categories(out["1"].categories(), ref.categories, ref.ambiguous)
    assert check.passed, check.summary()


def _blocked_layers(n, n_layers, rng, width=16, degree=32, scatter=0):
    """Layers whose outputs come in sets of ``width`` sharing ``degree`` random inputs
    (random values; ``scatter`` extra random inputs per output break the sharing)."""
    layers = []
    for _ in range(n_layers):
        rows, cols = [], []
        for j0 in range(0, n, width):
            ins = rng.choice(n, degree, replace=False)
            for j in range(j0, min(n, j0 + width)):
                extra = rng.choice(n, scatter, replace=False) if scatter else []
                both = np.union1d(ins, extra)
                rows.append(both)
                cols.append(np.full(both.size, j))
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        vals = rng.uniform(0.5, 1.5, rows.size) * 4 / degree
        w = sps.csc_matrix((vals, (rows, cols)), (n, n))
        layers.append(sd.SparseMatrix.from_scipy(w[:, rng.permutation(n)]))
    return layers


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize(
    "n, batch, scatter, split, expect_mma",
    [
        (2048, 300, 0, "2", True),  # dense 8 x 8 tiles: the tensor-core form
        (1000, 77, 0, "1", True),  # a partial group and tile, one thread per output
        (2048, 40, 3, "2", False),  # scattered inputs: > 144 tiles per group, FMA kernel
        (3000, 50, 0, "2", True),
    ],
)
def test_tensor_core_form(n, batch, scatter, split, expect_mma, monkeypatch):
    """The footprint layers' tensor-core form (TF32 in three passes) matches the float64
    reference to float32 tolerance and its categories; where a group does not fit it (or
    x is not finite, or the clip is infinite) the FMA kernel runs: the results equal the
    FMA kernel's bit for bit."""
    rng = np.random.default_rng(n + scatter)
    layers = _blocked_layers(n, 4, rng, scatter=scatter)
    x = (rng.random((batch, n)) < 0.3) * rng.uniform(0, 1, (batch, n))
    x[::5] = 0
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    monkeypatch.setenv("SPDNN_FP_TAIL", "off")
    monkeypatch.setenv("SPDNN_FP_SPLIT", split)
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        for clip in (32.0, None):
            net = sd.SparseDNN(layers, -0.05, clip=clip)
            for mma in ("0", "1"):
                monkeypatch.setenv("SPDNN_FP_MMA", mma)
                out[mma, clip] = net(x.astype(np.float32))
            bad = x.astype(np.float32).copy()
            bad[1, 3] = np.nan
            for mma in ("0", "1"):
                monkeypatch.setenv("SPDNN_FP_MMA", mma)
                out[mma, clip, "nan"] = net(bad)
    ref = reference_inference(layers, -0.05, x)
    fma, tc = out["0", 32.0], out["1", 32.0]
    ok = ~np.isin(np.arange(batch), ref.ambiguous)
    np.testing.assert_allclose(
        np.asarray(tc.features)[ok], ref.features.toarray()[ok], rtol=2e-5, atol=2e-5
    )
    check = check_categories(tc.categories(), ref.categories, ref.ambiguous)
    assert check.passed, check.summary()
    np.testing.assert_array_equal(np.asarray(tc.active_per_layer), np.asarray(fma.active_per_layer))
    np.testing.assert_array_equal(np.asarray(tc.alive), np.any(np.asarray(tc.features) != 0, 1))
    live = np.asarray(tc.active_per_layer)
    assert live[-1] >= batch // 2, live  # rows live to the end: the last layers compute
    same = np.array_equal(np.asarray(tc.features), np.asarray(fma.features))
    assert same != expect_mma  # random weights: TF32 passes round differently somewhere
    for key in ((None,), (32.0, "nan"), (None, "nan")):  # the FMA kernel runs
        a, b = out[("0", *key)], out[("1", *key)]
        np.testing.assert_array_equal(np.asarray(b.features), np.asarray(a.features))
        np.testing.assert_array_equal(
            np.asarray(b.active_per_layer), np.asarray(a.active_per_layer)
        )


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("width", [16, 24])  # dense units; one in three spans two sets
@pytest.mark.parametrize("exact", [False, True])  # weights exact in TF32: two passes
def test_tensor_core_units(width, exact, monkeypatch):
    """The tensor-core form takes units of 16 outputs over the union of their slots: where
    a unit spans two sets of outputs with different inputs its tiles hold zeros. Either
    way the results match the float64 reference to float32 tolerance, and the rows that
    live match the FMA kernel's."""
    n, batch = 2048, 200
    rng = np.random.default_rng(width)
    layers = _blocked_layers(n, 3, rng, width=width)
    if exact:
        layers = [
            sd.SparseMatrix(W.indptr, W.indices, np.full(W.nnz, 1 / 16, np.float32), W.shape)
            for W in layers
        ]
    for W in layers:
        t = sd.tensor_core_tiles(W.structure)
        assert t.fits and (t.density == 1.0) == (width == 16), t.density
    x = (rng.random((batch, n)) < 0.3) * rng.uniform(0, 1, (batch, n))
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    monkeypatch.setenv("SPDNN_FP_TAIL", "off")
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        net = sd.SparseDNN(layers, -0.05, clip=32.0)
        for mma in ("1", "0"):
            monkeypatch.setenv("SPDNN_FP_MMA", mma)
            out[mma] = net(x.astype(np.float32))
    ref = reference_inference(layers, -0.05, x)
    ok = ~np.isin(np.arange(batch), ref.ambiguous)
    np.testing.assert_allclose(
        np.asarray(out["1"].features)[ok], ref.features.toarray()[ok], rtol=2e-5, atol=2e-5
    )
    check = check_categories(out["1"].categories(), ref.categories, ref.ambiguous)
    assert check.passed, check.summary()
    np.testing.assert_array_equal(
        np.asarray(out["1"].active_per_layer), np.asarray(out["0"].active_per_layer)
    )
    assert np.asarray(out["1"].active_per_layer)[-1] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize(
    "n, degree, batch",
    [
        (1024, 32, 1000),  # 16-row tiles, one output per thread
        (100, 7, 37),  # one partial slice of outputs, a partial tile
        (1500, 20, 70),  # two outputs per thread, the second partly idle
        (3000, 12, 45),  # 8-row tiles, four outputs per thread
        (4096, 32, 300),  # the widest tail
    ],
)
@pytest.mark.parametrize("bias", [-0.2, 0.05])  # rows dropped; kept (positive bias)
def test_stationary_tail(n, degree, batch, bias, monkeypatch):
    """The stationary network kernel (every split of the layers into launches, from the
    first layer on or after footprint layers, units of 1, 2 and 4 outputs, tiles of 16
    and of 32 rows and a switch between them as rows die, the first launch reading x
    itself or interleaved rows) gives the footprint kernel's features bit for bit, its
    active counts and the rows it reports nonzero; outputs share input sets (four each),
    some have none, rows die at the start, on the way and never."""
    rng = np.random.default_rng(n + batch)
    layers = []
    for _ in range(5):
        base = np.stack([rng.choice(n, degree, replace=False) for _ in range(-(-n // 4))])
        inputs = np.repeat(base, 4, axis=0)[rng.permutation(n)]  # sets shared by 4 outputs
        keep = rng.random(n) > 0.05  # outputs with no inputs
        rows = inputs[keep].reshape(-1)
        cols = np.repeat(np.arange(n)[keep], degree)
        vals = rng.uniform(0.5, 1.5, rows.size) * 3 / degree
        layers.append(sd.SparseMatrix.from_scipy(sps.csc_matrix((vals, (rows, cols)), (n, n))))
    x = (rng.random((batch, n)) < 0.2) * rng.uniform(0, 1, (batch, n))
    x[::4] = 0  # dead from the start
    x[1::7] *= 0.05  # die on the way
    x[2] = 0.9  # survives everything
    net = sd.SparseDNN(layers, bias, clip=2.0)
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        # SPDNN_FP_TAIL: head, launch length, outputs per unit (auto: 4 where n <= 2048,
        # else 2), one-layer launches; SPDNN_STAT_TALL: 32-row tiles from this many rows
        # on (32-row tiles apply up to n = 1024); SPDNN_STAT_DIRECT=0: interleave x first.
        half = str(batch // 2)
        for tail, tall, direct in [
            ("off", None, None),
            ("0,1", "off", None),
            ("0,64", "0", None),
            ("0,2,1", half, "0"),
            ("2,1,2", "0", None),
            ("3,64,1", "off", None),
            ("1,3,4", half, None),
            ("0,8,0,3", None, "0"),
            ("0,3", half, None),
        ]:
            env = {"SPDNN_FP_TAIL": tail, "SPDNN_STAT_TALL": tall, "SPDNN_STAT_DIRECT": direct}
            for k, v in env.items():
                if v is None:
                    monkeypatch.delenv(k, raising=False)
                else:
                    monkeypatch.setenv(k, v)
            out[tail, tall, direct] = net(x.astype(np.float32))
    base = out.pop(("off", None, None))
    np.testing.assert_array_equal(
        np.asarray(base.alive), np.any(np.asarray(base.features) != 0, axis=1)
    )
    for key, r in out.items():
        msg = f"SPDNN_FP_TAIL, SPDNN_STAT_TALL, SPDNN_STAT_DIRECT = {key}"
        np.testing.assert_array_equal(
            np.asarray(r.features), np.asarray(base.features), err_msg=msg
        )
        np.testing.assert_array_equal(
            np.asarray(r.active_per_layer), np.asarray(base.active_per_layer), err_msg=msg
        )
        np.testing.assert_array_equal(np.asarray(r.alive), np.asarray(base.alive), err_msg=msg)
    assert 0 < np.asarray(base.active_per_layer)[-1] < batch or bias > 0


@pytest.mark.parametrize(
    "platform",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("batch", [4095, 4096, 4097, 50001])
@pytest.mark.parametrize("bias", [-0.25, 0.05])  # rows dropped; rows kept (positive bias)
def test_row_lists_across_blocks(platform, batch, bias, monkeypatch):
    """Large batches with rows dying unevenly (whole stretches dead, single survivors at
    the edges of the CUDA row compaction's 4096-row segments, which several blocks list
    from 4096 rows on): features and active counts match the float64 reference, with
    dead rows dropped and kept."""
    rng = np.random.default_rng(batch)
    n = 64
    layers = [
        sd.SparseMatrix.from_scipy(random_sparse(rng, n, n, 0.25, empty_rows=0.05))
        for _ in range(4)
    ]
    x = (rng.random((batch, n)) < 0.3) * rng.uniform(0, 1, (batch, n))
    x[: batch // 3] = 0  # a dead stretch longer than a block's segment
    x[batch // 3 + 1 : batch // 2 : 2] = 0  # every other row dead
    x[4095 : min(batch, 4097)] = rng.uniform(0.5, 1, (min(batch, 4097) - 4095, n))
    x[-1] = rng.uniform(0.5, 1, n)  # the last row survives the input check
    h, active = x, []
    for W in layers:  # float64 reference
        h = np.minimum(np.maximum(h @ W.to_scipy().toarray() + bias, 0), 32.0)
        active.append(int(np.any(h != 0, axis=1).sum()))
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    with jax.default_device(jax.devices(platform)[0]):
        out = sd.SparseDNN(layers, bias)(x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out.features), h, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out.active_per_layer), active)


def test_segment_ends_and_options(monkeypatch):
    from jax_spdnn.dnn import resident_groups, segment_ends

    assert segment_ends(1) == (1,)
    assert segment_ends(12, 8, 32) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12)
    assert segment_ends(120, 0, 1) == tuple(range(1, 121))
    assert segment_ends(20, 0, 64) == (2, 6, 14, 20)
    ends = segment_ends(1920)
    assert ends[-1] == 1920 and max(np.diff(ends)) == 32 and np.all(np.diff(ends) > 0)
    with pytest.raises(ValueError, match="max_segment"):
        segment_ends(10, 0, 0)
    assert [resident_groups(n) for n in (16, 512, 1024, 2048, 4096, 8192)] == [1, 1, 2, 4, 8, None]
    net = sd.SparseDNN(radixnet(64, 2, seed=0), -0.3)
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "fast")
    with pytest.raises(ValueError, match="SPDNN_DNN_KERNEL"):
        net(np.zeros((2, 64), np.float32))
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "auto")
    monkeypatch.setenv("SPDNN_FP_GROUP", "1000")
    with pytest.raises(ValueError, match="SPDNN_FP_GROUP"):
        sd.sparse.footprint_group()
    monkeypatch.delenv("SPDNN_FP_GROUP")
    monkeypatch.setenv("SPDNN_DNN_SEGMENTS", "8")
    with pytest.raises(ValueError, match="SPDNN_DNN_SEGMENTS"):
        net(np.zeros((2, 64), np.float32))


def test_tail_schedule_and_options(monkeypatch):
    from jax_spdnn.dnn import TAIL_HEAD, TAIL_MAX, TAIL_SINGLES, tail_options, tail_schedule

    assert tail_options() == (-1, TAIL_MAX, 0, TAIL_SINGLES)
    assert tail_schedule(1024, 12, np.float32, (0, 32, 0, 4)) == (0, (1, 2, 3, 4, 6, 10, 12))
    assert tail_schedule(1024, 12, np.float32, (2, 32, 0, 4)) == (2, (3, 4, 6, 10, 12))
    assert tail_schedule(1024, 20, np.float32, (-1, 32)) == (TAIL_HEAD[16], (2, 6, 14, 20))
    assert tail_schedule(4096, 20, np.float32, (-1, 32)) == (TAIL_HEAD[8], (10, 14, 20))
    assert tail_schedule(1024, 20, np.float32, (8, 32)) == (8, (10, 14, 20))
    assert tail_schedule(1024, 5, np.float32, (0, 1)) == (0, (1, 2, 3, 4, 5))
    assert tail_schedule(1024, 120, np.float32, (0, 200)) == (0, (2, 6, 14, 30, 62, 120))
    assert tail_schedule(1024, 8, np.float32, (8, 32)) == (8, ())  # nothing left for it
    assert tail_schedule(4097, 20, np.float32, (0, 4)) == (20, ())  # too wide
    for dtype in (np.float64, jnp.bfloat16, np.float16):  # float32 storage only
        assert tail_schedule(1024, 20, dtype, (0, 4)) == (20, ())
    monkeypatch.setenv("SPDNN_FP_TAIL", "off")
    assert tail_options() is None and tail_schedule(1024, 20, np.float32, None) == (20, ())
    monkeypatch.setenv("SPDNN_FP_TAIL", "3,4")
    assert tail_options() == (3, 4, 0, TAIL_SINGLES)
    monkeypatch.setenv("SPDNN_FP_TAIL", "3,4,2")
    assert tail_options() == (3, 4, 2, TAIL_SINGLES)
    monkeypatch.setenv("SPDNN_FP_TAIL", "3,4,2,5")
    assert tail_options() == (3, 4, 2, 5)
    for bad in ("3", "a,b", "-1,4", "2,0", "1,2,3", "1,2,4,-1", "1,2,4,4,4"):
        monkeypatch.setenv("SPDNN_FP_TAIL", bad)
        with pytest.raises(ValueError, match="SPDNN_FP_TAIL"):
            tail_options()


@pytest.mark.parametrize("kernel", ["auto", "footprint"])
def test_edge_cases(device, kernel, monkeypatch):
    if kernel != "auto" and device.platform == "cpu":
        pytest.skip("the CPU has one network kernel")
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
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


@pytest.mark.parametrize("kernel", ["auto", "footprint"])
@pytest.mark.parametrize("dtype", [np.float64, jnp.bfloat16, jnp.float16])
def test_dtypes(device, dtype, kernel, monkeypatch):
    if kernel != "auto" and device.platform == "cpu":
        pytest.skip("the CPU has one network kernel")
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("bias", [-0.3, 0.05])
def test_operands_placed_once(device, dtype, bias, monkeypatch):
    """A call on a concrete input puts the packed index arrays on its device once and
    passes them as arguments; under an outer jit they are constants of the program. Both
    give the same results bit for bit, and later calls reuse the placed arrays."""
    monkeypatch.setenv("SPDNN_LINEAR_KERNEL", "layer")
    net = sd.SparseDNN(radixnet(1024, 6, seed=4), bias)
    x = jnp.asarray(random_inputs(1024, 45, seed=2), dtype)
    got = net(x)
    assert len(net._placed) == 1
    ((path, arrays, _),) = net._placed.values()
    assert path in ("cpu", "cuda-fp") and all(a.devices() == {device} for a in arrays)
    want = jax.jit(lambda net, x: net(x))(net, x)  # constants path
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = net(x[:7])
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(got.features[:7]))
    assert len(net._placed) == 1 and net._placed[next(iter(net._placed))][1] is arrays
    # another option set is another entry; a rebuilt network starts with none
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "layer")
    np.testing.assert_array_equal(np.asarray(net(x).features), np.asarray(got.features))
    assert len(net._placed) == 2
    assert jax.tree_util.tree_map(lambda a: a, net)._placed == {}


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
@pytest.mark.parametrize(
    "kernel, n, tail, dtype",
    [
        ("auto", 1024, None, jnp.float32),  # footprint with the stationary tail
        ("footprint", 1024, "off", jnp.float32),
        ("footprint", 1024, None, jnp.bfloat16),
        ("footprint", 1024, "1,2,1", jnp.float32),  # a footprint head, then the tail
        ("layer", 256, None, jnp.float32),
        ("auto", 512, None, jnp.float32),  # the hybrid: layer kernel, then resident
        ("resident", 256, None, jnp.float16),
    ],
)
def test_placed_operands_lower_like_constants(kernel, n, tail, dtype, monkeypatch):
    """With the operands placed, the CUDA program makes the same FFI call (target,
    attributes, operand and result types) as with them embedded, takes every index array
    as an argument and embeds no array constant of more than one element."""
    import re

    from jax_spdnn import dnn

    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
    if tail:
        monkeypatch.setenv("SPDNN_FP_TAIL", tail)
    net = sd.SparseDNN(radixnet(n, 11, seed=0), -0.3)  # the hybrid: 8 + 3 layers
    x = jax.ShapeDtypeStruct((37, n), dtype)
    k, segments = dnn._cuda_options()
    opts = dict(kernel=k, segments=segments, tail=dnn.tail_options())
    path = dnn._cuda_path(net, dtype, k)
    arrays, static = dnn._plan(net, path, dtype, **opts)
    lower = dict(lowering_platforms=("cuda",))
    embedded = dnn._forward.trace(net, x, drop_dead=True, **opts).lower(**lower).as_text()
    placed = dnn._forward_placed.trace(
        net, x, arrays, path=path, static=static, drop_dead=True
    ).lower(**lower)
    placed = placed.as_text()

    def call(text):
        (line,) = [t for t in text.splitlines() if "stablehlo.custom_call" in t]
        return re.sub(r"custom_call @(\w+)\([^)]*\)", r"\1", line).strip().split("= ", 1)[1]

    assert call(placed) == call(embedded)
    (main,) = [t for t in placed.splitlines() if "func.func public @main" in t]
    assert len(re.findall(r"%arg\d+: tensor<", main)) == 1 + len(net.layers) + 1 + len(arrays)
    big = re.findall(r"stablehlo.constant dense<[^>]*> : tensor<(\d+)x", placed)
    assert all(int(m) <= 1 for m in big), big
    assert len(embedded) > 4 * len(placed)  # the embedded arrays


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


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
@pytest.mark.parametrize(
    "kernel, n, target",
    [
        ("layer", 1024, "spdnn_sparse_dnn_ell"),
        ("auto", 512, "spdnn_sparse_dnn_resident"),
        ("auto", 1024, "spdnn_sparse_dnn_footprint"),
        ("auto", 2048, "spdnn_sparse_dnn_footprint"),
        ("layer", 2048, "spdnn_sparse_dnn_ell"),
        ("footprint", 1024, "spdnn_sparse_dnn_footprint"),
        ("resident", 2048, "spdnn_sparse_dnn_resident"),
        ("resident", 8192, "spdnn_sparse_dnn_ell"),
    ],
)
def test_cuda_lowering_without_a_gpu(kernel, n, target, monkeypatch):
    """The CUDA paths lower (trace, operand packing, FFI attributes) on any machine where
    the CUDA kernels are built, so CI without a GPU checks the Python side of both."""
    import re

    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)
    net = sd.SparseDNN(radixnet(n, 10, seed=0), -0.3)
    x = jax.ShapeDtypeStruct((37, n), jnp.float32)
    text = (
        jax.jit(lambda net, x: net(x)).trace(net, x).lower(lowering_platforms=("cuda",)).as_text()
    )
    assert set(re.findall(r"custom_call @(\w+)", text)) == {target}
    if target == "spdnn_sparse_dnn_footprint" and n <= 2048:  # every layer on the tail
        assert "tail_start = 0" in text and "tail_ends = dense<[2, 6, 10]>" in text
    if target == "spdnn_sparse_dnn_footprint":  # the kernel reports the nonzero rows
        assert "tensor<10xi32>, tensor<37xi1>, tensor<" in text
        assert f"tensor<37x{n}xi1>" not in text  # no y != 0 pass
    else:
        assert f"tensor<37x{n}xi1>" in text


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
def test_cuda_lowering_of_the_tail(monkeypatch):
    """The tail's attributes and operands as lowered: its layers' weights in 16-bit
    indices, nothing for it when turned off or with bfloat16 storage."""
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    net = sd.SparseDNN(radixnet(1024, 12, seed=0), -0.3)

    def lower(dtype):
        x = jax.ShapeDtypeStruct((37, 1024), dtype)
        return jax.jit(lambda net, x: net(x)).trace(net, x).lower(lowering_platforms=("cuda",))

    monkeypatch.setenv("SPDNN_FP_TAIL", "2,4")
    text = lower(jnp.float32).as_text()
    assert "tail_start = 2" in text and "tail_ends = dense<[4, 8, 12]>" in text
    # 16 outputs share each input set: units of four; 10 layers x 256 groups x 128 / 4
    assert "tail_units = 4" in text and "tensor<81920xui16>" in text
    monkeypatch.setenv("SPDNN_FP_TAIL", "2,4,1")
    text = lower(jnp.float32).as_text()
    assert "tail_units = 1" in text and "tensor<327680xui16>" in text
    monkeypatch.setenv("SPDNN_FP_TAIL", "off")
    text = lower(jnp.float32).as_text()
    assert "tail_start = 12" in text and "tail_ends = dense<> : tensor<0xi64>" in text
    monkeypatch.delenv("SPDNN_FP_TAIL")
    text = lower(jnp.bfloat16).as_text()
    assert "tail_start = 12" in text
