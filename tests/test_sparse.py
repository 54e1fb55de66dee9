"""SparseMatrix: constructors agree with each other and with the dense matrix,
every validation error fires with a message naming the problem, pytree behaviour."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sps
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse as jsparse
from reference import random_sparse

import jax_spdnn as sd
from jax_spdnn.challenge import radixnet


@given(
    n_in=st.integers(0, 40),
    n_out=st.integers(0, 40),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_constructors_agree(n_in, n_out, density, seed):
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n_in, n_out, density, empty_rows=0.2)
    dense = w.toarray()
    coo = w.tocoo()
    mats = [
        sd.SparseMatrix.from_scipy(w),
        sd.SparseMatrix.from_scipy(w.tocsr()),
        sd.SparseMatrix.from_dense(dense),
        sd.SparseMatrix.from_triplets(coo.row, coo.col, coo.data, (n_in, n_out)),
        sd.SparseMatrix.from_bcoo(jsparse.BCOO.fromdense(dense)),
        sd.SparseMatrix.from_bcsr(jsparse.BCSR.fromdense(dense)),
    ]
    for m in mats:
        assert m.shape == (n_in, n_out)
        assert m.nnz == w.nnz
        assert m.structure == mats[0].structure
        np.testing.assert_array_equal(np.asarray(m.todense()), dense)
        np.testing.assert_array_equal(m.to_scipy().toarray(), dense)
        # stored by output neuron, sorted inputs per row
        for j in range(n_out):
            row = m.indices[m.indptr[j] : m.indptr[j + 1]]
            assert np.all(np.diff(row) > 0)
    np.testing.assert_array_equal(np.asarray(mats[0].T.todense()), dense.T)


def test_properties_and_dtype():
    w = sps.random(5, 7, density=0.4, format="csr", random_state=0)
    m = sd.SparseMatrix.from_scipy(w, dtype=np.float32)
    assert m.dtype == np.float32 and m.n_in == 5 and m.n_out == 7
    assert m.indptr.shape == (8,) and m.indptr.dtype == np.int32
    assert m.astype(np.float64).dtype == np.float64
    assert "nnz" in repr(m)
    with pytest.raises(ValueError):
        m.indices[0] = 1  # the structure is immutable


def test_from_dense_threshold():
    w = np.array([[0.05, -0.2], [0.0, 0.11]])
    m = sd.SparseMatrix.from_dense(w, threshold=0.1)
    np.testing.assert_array_equal(np.asarray(m.todense()), [[0.0, -0.2], [0.0, 0.11]])
    assert m.nnz == 2


def test_empty_rows_and_matrix_are_legal():
    m = sd.SparseMatrix(np.zeros(4, np.int32), np.zeros(0, np.int32), np.zeros(0), (5, 3))
    assert m.nnz == 0
    np.testing.assert_array_equal(np.asarray(m.todense()), np.zeros((5, 3)))
    m = sd.SparseMatrix([0, 0, 2, 2], [1, 4], [1.0, 2.0], (5, 3))
    assert m.nnz == 2


def test_pytree_and_jit_cache():
    w = sps.random(6, 4, density=0.5, format="csr", random_state=1)
    m = sd.SparseMatrix.from_scipy(w)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 1 and leaves[0].shape == (m.nnz,)
    m2 = jax.tree_util.tree_unflatten(treedef, [leaves[0] * 2])
    np.testing.assert_allclose(np.asarray(m2.todense()), 2 * w.toarray())
    traces = []

    @jax.jit
    def f(m):
        traces.append(1)
        return m.todense().sum()

    f(m)
    f(sd.SparseMatrix.from_scipy(w * 3))  # same structure, new values: no retrace
    assert len(traces) == 1
    f(sd.SparseMatrix.from_scipy(sps.random(6, 4, density=0.2, format="csr", random_state=2)))
    assert len(traces) == 2
    g = jax.grad(lambda m: jnp.sum(m.todense() ** 2))(m)
    np.testing.assert_allclose(np.asarray(g.values), 2 * np.asarray(m.values))


def test_transpose_structure():
    w = sps.random(9, 6, density=0.3, format="csr", random_state=3)
    m = sd.SparseMatrix.from_scipy(w)
    st_, perm = m.structure.transpose
    assert st_.shape == (6, 9)
    np.testing.assert_array_equal(np.asarray(m.T.todense()), w.toarray().T)
    assert sorted(perm.tolist()) == list(range(m.nnz))


def test_block_diag_structure():
    w = sps.random(4, 3, density=0.5, format="csr", random_state=4)
    m = sd.SparseMatrix.from_scipy(w)
    bd = m.structure.block_diag(3)
    big = sd.SparseMatrix(bd.indptr, bd.indices, np.tile(np.asarray(m.values), 3), bd.shape)
    np.testing.assert_array_equal(np.asarray(big.todense()), sps.block_diag([w, w, w]).toarray())


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (([0, 1, 2], [0, 5], [1.0, 1.0], (3, 2)), "input index 5 out of range for n_in=3"),
        (([0, 1, 2], [0, -1], [1.0, 1.0], (3, 2)), "input index -1 out of range"),
        (([0, 2, 1], [0, 1], [1.0, 1.0], (3, 2)), "indptr is not monotone"),
        (([0, 1], [0], [1.0], (3, 2)), "indptr must have length n_out \\+ 1 = 3"),
        (([1, 1, 2], [0, 1], [1.0, 1.0], (3, 2)), "indptr\\[0\\] must be 0"),
        (([0, 1, 3], [0, 1], [1.0, 1.0], (3, 2)), "does not match the number of indices"),
        (([0, 2, 2], [1, 1], [1.0, 1.0], (3, 2)), "duplicate entry W\\[1, 0\\]"),
        (([0, 2, 2], [2, 1], [1.0, 1.0], (3, 2)), "sorted within each output row"),
        (([0, 1, 2], [0, 1], [1.0, 1.0, 3.0], (3, 2)), "values must have shape \\(2,\\)"),
        (([0, 1, 2], [0, 1], [1.0, np.nan], (3, 2)), "values must be finite"),
        (([0, 1, 2], [0, 1], [np.inf, 1.0], (3, 2)), "values must be finite"),
        (([0, 1, 2], [0, 1], [1.0, 1.0], (3, 2, 1)), "shape must be \\(n_in, n_out\\)"),
        (([0.0, 1.0, 2.0], [0, 1], [1.0, 1.0], (3, 2)), "indptr must be integer"),
    ],
)
def test_csr_validation(args, match):
    with pytest.raises(ValueError, match=match):
        sd.SparseMatrix(*args)


def test_triplet_and_scipy_validation():
    with pytest.raises(ValueError, match="duplicate entry"):
        sd.SparseMatrix.from_triplets([0, 0], [1, 1], [1.0, 2.0], (2, 2))
    with pytest.raises(ValueError, match="row \\(input\\) index 3 out of range for size 2"):
        sd.SparseMatrix.from_triplets([3], [0], [1.0], (2, 2))
    with pytest.raises(ValueError, match="column \\(output\\) index 2 out of range"):
        sd.SparseMatrix.from_triplets([0], [2], [1.0], (2, 2))
    with pytest.raises(ValueError, match="equal lengths"):
        sd.SparseMatrix.from_triplets([0, 1], [0], [1.0], (2, 2))
    with pytest.raises(ValueError, match="finite"):
        sd.SparseMatrix.from_triplets([0], [0], [np.nan], (2, 2))
    dup = sps.coo_matrix(([1.0, 2.0], ([0, 0], [1, 1])), shape=(2, 2))
    with pytest.raises(ValueError, match="duplicate entry W\\[0, 1\\]"):
        sd.SparseMatrix.from_scipy(dup)
    with pytest.raises(TypeError, match="scipy.sparse"):
        sd.SparseMatrix.from_scipy(np.eye(2))
    with pytest.raises(ValueError, match="2-D"):
        sd.SparseMatrix.from_dense(np.ones(3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        sd.SparseMatrix.from_dense(np.array([[np.inf]]))
    m = sd.SparseMatrix.from_dense(np.eye(2))
    with pytest.raises(ValueError, match="values must have shape \\(2,\\)"):
        m.with_values(np.ones(3))


@given(
    n_out=st.integers(0, 200),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_sliced_ell(n_out, density, seed):
    """Every nonzero lands at slice_ptr[w] + 32 s + l with its value; padding is inert."""
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, 50, n_out, density, empty_rows=0.3)
    m = sd.SparseMatrix.from_scipy(w)
    e = sd.pack_sliced_ell(m.structure)
    n_slices = -(-n_out // 32)
    assert e.slice_ptr.shape == (n_slices + 1,) and e.slice_ptr[0] == 0
    assert e.total % 32 == 0 and e.total >= m.nnz
    packed = np.asarray(e.pack_values(jnp.asarray(m.values)))
    dense = np.zeros((50, n_out))
    for wi in range(n_slices):
        length = (e.slice_ptr[wi + 1] - e.slice_ptr[wi]) // 32
        for lane in range(32):
            j = 32 * wi + lane
            slots = e.slice_ptr[wi] + 32 * np.arange(length) + lane
            idx = e.indices[slots]
            real = idx != sd.sparse.ELL_PAD_INDEX
            assert np.all(np.diff(idx[real]) > 0) and np.all(
                real[: real.sum()]
            )  # sorted, pads last
            if j >= n_out:
                assert not real.any()
                continue
            assert real.sum() == m.indptr[j + 1] - m.indptr[j]
            assert np.all(packed[slots[~real]] == 0)
            dense[idx[real], j] = packed[slots[real]]
    np.testing.assert_array_equal(dense, w.toarray())
    # regular rows: no padding
    reg = sd.SparseMatrix(
        np.arange(0, 4 * 64 + 1, 4), np.tile([0, 1, 2, 3], 64), np.ones(256), (4, 64)
    )
    assert reg.structure.sliced_ell.padding == 1.0


@given(
    n_in=st.integers(1, 80),
    n_out=st.integers(0, 300),
    group=st.sampled_from([32, 64, 1024]),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    dup=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_footprint(n_in, n_out, group, density, dup, seed):
    """The footprint packing holds W exactly: each reordered output's slots, read through
    its group's footprint, are its inputs in increasing order with their values; footprints
    are the distinct inputs of their group, ascending; outputs with equal inputs are
    adjacent in the order."""
    rng = np.random.default_rng(seed)
    base = random_sparse(rng, n_in, -(-n_out // dup), density, empty_rows=0.3).toarray()
    w = np.repeat(base, dup, axis=1)[:, :n_out]  # outputs repeated: equal input sets
    w = w[:, rng.permutation(n_out)] * rng.uniform(0.5, 1.5, w.shape)
    m = sd.SparseMatrix.from_dense(w)
    fp = sd.pack_footprint(m.structure, group)
    assert sorted(fp.perm.tolist()) == list(range(n_out))
    n_groups = -(-n_out // group)
    assert fp.fp_ptr.shape == (n_groups + 1,) and fp.fp_ptr[0] == 0
    assert fp.slice_ptr.shape == (-(-n_out // 32) + 1,)
    packed = np.asarray(fp.pack_values(jnp.asarray(m.values)))
    dense = np.zeros_like(w)
    for jr in range(n_out):
        g, wi, lane = jr // group, jr // 32, jr % 32
        cols = fp.fp_cols[fp.fp_ptr[g] : fp.fp_ptr[g + 1]]
        slots = np.arange(fp.slice_ptr[wi] + lane, fp.slice_ptr[wi + 1], 32)
        idx = fp.indices[slots]
        real = idx != sd.sparse.ELL_PAD_INDEX
        assert np.all(real[: real.sum()]) and np.all(packed[slots[~real]] == 0)
        inputs = cols[idx[real]]
        assert np.all(np.diff(inputs) > 0)  # summed in increasing input order
        dense[inputs, fp.perm[jr]] = packed[slots[real]]
    np.testing.assert_array_equal(dense, w)
    for g in range(n_groups):
        outs = fp.perm[g * group : (g + 1) * group]
        want = np.flatnonzero(np.any(w[:, outs] != 0, axis=1))
        np.testing.assert_array_equal(fp.fp_cols[fp.fp_ptr[g] : fp.fp_ptr[g + 1]], want)
    sets = [tuple(np.flatnonzero(w[:, j])) for j in fp.perm]
    runs = sum(1 for k in range(n_out) if k == 0 or sets[k] != sets[k - 1])
    assert runs == len(set(sets))  # each distinct input set is one run
    assert m.structure.footprint(group).staged == fp.staged
    assert m.structure.footprint(group) is m.structure.footprint(group)  # cached


@given(
    n_in=st.integers(1, 700),
    n_out=st.integers(0, 600),
    group=st.sampled_from([32, 256]),
    density=st.sampled_from([0.0, 0.01, 0.05, 0.3]),
    dup=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_tensor_core_tiles(n_in, n_out, group, density, dup, seed):
    """The tensor-core form's tile counts, unit by unit from the footprint order: a
    unit of 16 outputs takes ceil(u / 8) tiles for its u distinct inputs; footprints are
    the groups' distinct inputs; fits and density follow from them."""
    rng = np.random.default_rng(seed)
    base = random_sparse(rng, n_in, -(-n_out // dup), density, empty_rows=0.2).toarray()
    w = np.repeat(base, dup, axis=1)[:, :n_out][:, rng.permutation(n_out)]
    s = sd.SparseMatrix.from_dense(w).structure
    t = sd.tensor_core_tiles(s, group)
    order = sd.footprint_order(s)
    n_groups = -(-n_out // group)
    tiles, footprint = np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64)
    for b0 in range(0, n_out, 16):
        u = np.any(w[:, order[b0 : b0 + 16]] != 0, axis=1).sum()
        tiles[b0 // group] += -(-u // 8)
    for g in range(n_groups):
        footprint[g] = np.any(w[:, order[g * group : (g + 1) * group]] != 0, axis=1).sum()
    np.testing.assert_array_equal(t.tiles, tiles)
    np.testing.assert_array_equal(t.footprint, footprint)
    fits = bool(np.all(footprint <= 512) and np.all(tiles <= 144))
    assert t.fits == fits
    held = 128 * tiles.sum()
    assert t.density == pytest.approx(s.nnz / held if held else 1.0)


def test_tensor_core_tiles_of_networks():
    """RadiX-Net layers cut into dense tiles (their outputs come in sets sharing inputs, and
    the footprint order puts them together); random layers of the same degree do not fit.
    The limits are the CUDA kernel's."""
    for w in radixnet(1024, 12)[::4]:
        t = sd.tensor_core_tiles(w.structure)
        assert t.fits and t.density == 1.0 and t.tiles.max() == 64
    rng = np.random.default_rng(0)
    rand = sps.random(2048, 2048, 32 / 2048, random_state=rng, format="csc")
    t = sd.tensor_core_tiles(sd.SparseMatrix.from_scipy(rand).structure)
    assert not t.fits and t.density < 0.2
    header = (Path(__file__).parents[1] / "cuda" / "footprint_layer.cuh").read_text()
    assert f"kMmaMaxCols = {sd.sparse.MMA_MAX_COLS};" in header
    assert f"kMmaTileCap = {sd.sparse.MMA_TILE_CAP};" in header
    assert f"kMmaUnit = {sd.sparse.MMA_TILE_OUTPUTS};" in header
    with pytest.raises(ValueError, match="multiple of 32"):
        sd.tensor_core_tiles(w.structure, 48)


def test_footprint_order_keys():
    """The order sorts by leading inputs, then by the hash of the whole set; a missing
    input sorts last."""
    w = np.zeros((12, 4))
    w[[3, 5], 0] = 1  # {3, 5}
    w[[1, 9], 1] = 1  # {1, 9}
    w[[3], 2] = 1  # {3}: shorter, so after {3, 5}
    w[[1, 9], 3] = 1  # equal to output 1
    order = sd.footprint_order(sd.SparseMatrix.from_dense(w).structure)
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    with pytest.raises(ValueError, match="multiple of 32"):
        sd.pack_footprint(sd.SparseMatrix.from_dense(w).structure, 48)


@given(
    n_in=st.integers(1, 70),
    n_out=st.integers(0, 90),
    groups=st.sampled_from([1, 2, 4, 8]),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_bank_split(n_in, n_out, groups, density, seed):
    """Every nonzero lands in its output's steps, in the lane group of its input's class,
    at its bank-split word; padding points at zero inputs past n_in with zero values."""
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n_in, n_out, density, empty_rows=0.3)
    m = sd.SparseMatrix.from_scipy(w)
    p = sd.pack_bank_split(m.structure, groups)
    R = 32 // groups
    assert p.rows == R and p.col_ptr.shape == (n_out + 1,) and p.col_ptr[0] == 0
    assert p.total == p.col_ptr[-1] * groups and p.total >= m.nnz
    steps = np.diff(p.col_ptr)
    assert np.all(steps % 2 == 0)
    packed = np.asarray(p.pack_values(jnp.asarray(m.values)))
    inputs = p.input_of(p.offsets)
    # the word of input i is i * R + s with s < R; XOR with a row stays inside the segment
    np.testing.assert_array_equal(p.offsets, sd.sparse.bank_offset(inputs, groups))
    assert np.all((p.offsets % R) == (inputs // groups) % R)
    dense = np.zeros((n_in, n_out))
    for j in range(n_out):
        e = p.col_ptr[j] * groups + np.arange(steps[j] * groups)
        group = (e % (2 * groups)) // 2
        assert np.all(inputs[e] % groups == group)  # each group its own bank class
        real = inputs[e] < n_in
        assert np.all(inputs[e][~real] < n_in + groups) and np.all(packed[e][~real] == 0)
        assert real.sum() == m.indptr[j + 1] - m.indptr[j]
        dense[inputs[e][real], j] = packed[e][real]
        # no more steps than the largest class needs (rounded up to even)
        cls = np.bincount(m.indices[m.indptr[j] : m.indptr[j + 1]] % groups, minlength=groups)
        assert steps[j] == cls.max() + cls.max() % 2
    np.testing.assert_array_equal(dense, w.toarray())
    # Bank property: at one step the lanes (g, r) of a warp read 32 distinct banks.
    i = rng.integers(0, n_in, size=groups) // groups * groups + np.arange(groups)
    words = (sd.sparse.bank_offset(i, groups)[:, None] ^ np.arange(R)[None, :]).ravel()
    assert len(set(words % 32)) == 32
    # ...and so does a warp staging 32 consecutive inputs of one row.
    c = 64 + np.arange(32)
    for r in range(R):
        assert len(set((sd.sparse.bank_offset(c, groups) ^ r) % 32)) == 32
    assert m.structure.bank_split(groups) is m.structure.bank_split(groups)
    with pytest.raises(ValueError, match="power of two"):
        sd.pack_bank_split(m.structure, 3)


@given(
    n=st.integers(1, 80),
    groups=st.sampled_from([1, 2, 4, 8]),
    density=st.sampled_from([0.0, 0.1, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_bank_split_layout_computes_the_product(n, groups, density, seed):
    """Emulates the resident GPU kernel's addressing on the host: features of a tile of
    R rows stored at word ``bank_offset(i) ^ r`` (zero inputs after the n real ones), every
    entry's weight times the word it points at, summed per output, is ``x @ W`` -- also
    with infinite features, which padding must never touch."""
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n, n, density, empty_rows=0.2)
    m = sd.SparseMatrix.from_scipy(w)
    p = sd.pack_bank_split(m.structure, groups)
    R = p.rows
    x = rng.standard_normal((R, n))
    x[rng.random((R, n)) < 0.05] = np.inf  # a real input may be infinite
    smem = np.zeros((n + groups) * R)
    for r in range(R):
        smem[sd.sparse.bank_offset(np.arange(n), groups) ^ r] = x[r]
    vals = np.asarray(p.pack_values(jnp.asarray(m.values)), np.float64)
    col = np.searchsorted(p.col_ptr, np.arange(p.total) // groups, side="right") - 1
    got = np.zeros((R, n))
    with np.errstate(invalid="ignore"):
        for r in range(R):
            np.add.at(got[r], col, vals * smem[p.offsets ^ r])
    dense = w.toarray()
    with np.errstate(invalid="ignore"):
        want = np.stack([(x[r][:, None] * dense).sum(axis=0, where=dense != 0) for r in range(R)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _stationary_slots(p):
    """(slice, step, lane) of every slot of a StationaryPack, from its documented layout."""
    group = np.arange(p.total) // 128
    slice_ = np.searchsorted(p.group_ptr, group, side="right") - 1
    step = (group - p.group_ptr[slice_]) * 4 + np.arange(p.total) % 4
    lane = np.arange(p.total) % 128 // 4
    return slice_, step, lane


@given(
    n_in=st.integers(0, 90),
    n_out=st.integers(0, 140),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    schedule=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_stationary(n_in, n_out, density, schedule, seed):
    """Every nonzero sits in exactly one slot, in its output's lane and slice, at a step
    below the slice's length (without the schedule: in CSR order); padding points at the
    zero column ``n_in`` with the appended zero value; with features emulated as the
    kernel stores them (infinite ones too, which padding must never touch) the packed
    layout computes ``x @ W``."""
    rng = np.random.default_rng(seed)
    w = random_sparse(rng, n_in, n_out, density, empty_rows=0.2)
    m = sd.SparseMatrix.from_scipy(w)
    s = m.structure
    p = sd.pack_stationary(s, schedule=schedule)
    assert p.indices.dtype == np.uint16 and p.total % 128 == 0
    assert len(p.group_ptr) == -(-n_out // 32) + 1
    real = p.source < s.nnz
    assert np.array_equal(np.sort(p.source[real]), np.arange(s.nnz))
    assert np.all(p.indices[~real] == n_in)
    assert np.array_equal(p.indices[real], s.indices[p.source[real]])
    slice_, step, lane = _stationary_slots(p)
    assert np.array_equal((slice_ * 32 + lane)[real], s.row_ids[p.source[real]])
    counts = np.diff(s.indptr)
    for o in range(n_out):  # a lane's nonzeros take its first steps, one each
        mine = real & (slice_ * 32 + lane == o)
        assert np.array_equal(np.sort(step[mine]), np.arange(counts[o]))
        if not p.scheduled:
            assert np.array_equal(p.source[mine][np.argsort(step[mine])], np.sort(p.source[mine]))
    R = 3
    x = rng.standard_normal((R, n_in))
    x[rng.random((R, n_in)) < 0.05] = np.inf
    smem = np.zeros((n_in + 1) * R)
    for r in range(R):
        smem[np.arange(n_in) * R + r] = x[r]
    vals = np.asarray(p.pack_values(jnp.asarray(m.values)), np.float64)
    got = np.zeros((R, max(n_out, 1)))
    with np.errstate(invalid="ignore"):
        for r in range(R):
            np.add.at(got[r], (slice_ * 32 + lane)[real], (vals * smem[p.indices * R + r])[real])
            assert np.all(vals[~real] * smem[p.indices[~real].astype(int) * R + r] == 0)
        dense = w.toarray()
        want = np.stack([(x[r][:, None] * dense).sum(axis=0, where=dense != 0) for r in range(R)])
    np.testing.assert_allclose(got[:, :n_out], want, rtol=1e-12, atol=1e-12)


@given(
    n_in=st.integers(0, 90),
    n_out=st.integers(0, 1100),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    units=st.sampled_from(sd.sparse.SHARED_SET_UNITS),
    dup=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_pack_shared_sets(n_in, n_out, density, units, dup, seed):
    """Emulates the stationary network kernel on the packing: every unit walks one input
    list for its outputs, which must all have that input set; each output's steps keep
    its CSR order; padding reads the zero column with a zero value; the sums equal
    ``x @ W`` (infinite features too); outputs sharing input sets fill the units."""
    rng = np.random.default_rng(seed)
    base = random_sparse(rng, n_in, max(1, -(-n_out // dup)), density, empty_rows=0.2)
    w = sps.hstack([base] * dup, format="csc")[:, rng.permutation(base.shape[1] * dup)[:n_out]]
    w = sps.csc_matrix(w, shape=(n_in, n_out))
    m = sd.SparseMatrix.from_scipy(w)
    s = m.structure
    p = sd.pack_shared_sets(s, units)
    assert p.units == units and p.total % 128 == 0 and p.indices.shape[0] * units == p.total
    slots = p.perm.shape[0]
    assert slots in (1024, 2048, 4096) and p.group_ptr.shape[0] == slots // 32 + 1
    assert np.array_equal(np.sort(p.perm[p.perm >= 0]), np.arange(n_out))
    real = p.source < s.nnz
    assert np.array_equal(np.sort(p.source[real]), np.arange(s.nnz))
    # slot -> (slice, group, unit in slice, step, output in unit)
    v = np.arange(p.total)
    group = v // 128
    j, rest = v % 128 // (4 * units), v % (4 * units)
    st_, k = rest // units, rest % units
    slice_ = np.searchsorted(p.group_ptr, group, side="right") - 1
    step = (group - p.group_ptr[slice_]) * 4 + st_
    unit = slice_ * (32 // units) + j
    neuron = p.perm[unit * units + k]
    inputs = p.indices[group * (128 // units) + j * 4 + st_].astype(np.int64)
    assert np.all(neuron[real] >= 0)
    assert np.array_equal(neuron[real], s.row_ids[p.source[real]])
    assert np.array_equal(inputs[real], s.indices[p.source[real]])
    assert np.all((inputs == n_in) | real | (neuron < 0) | (neuron >= 0))
    counts = np.diff(s.indptr)
    for o in range(n_out):
        mine = real & (neuron == o)
        assert np.array_equal(np.sort(step[mine]), np.arange(counts[o]))
        assert np.array_equal(p.source[mine][np.argsort(step[mine])], np.sort(p.source[mine]))
    R = 2
    x = rng.standard_normal((R, n_in + 1))
    x[:, :n_in][rng.random((R, n_in)) < 0.05] = np.inf
    x[:, n_in] = 0  # the zero column
    vals = np.asarray(p.pack_values(jnp.asarray(m.values)), np.float64)
    assert np.all(vals[~real] == 0) and np.all(inputs[~real & (neuron >= 0)] == n_in)
    got = np.zeros((R, n_out + 1))
    with np.errstate(invalid="ignore"):
        for r in range(R):
            np.add.at(got[r], np.where(real, neuron, n_out), np.where(real, vals * x[r, inputs], 0))
        dense = w.toarray()
        want = np.stack(
            [(x[r, :n_in, None] * dense).sum(axis=0, where=dense != 0) for r in range(R)]
        )
    np.testing.assert_allclose(got[:, :n_out], want, rtol=1e-12, atol=1e-12)
    if dup % units == 0 and density > 0 and n_out == base.shape[1] * dup:
        assert p.fill > 0.5  # duplicated sets mostly fill the units


def test_shared_sets_radixnet():
    """Challenge layers: 16 outputs share each input set at N = 1024, so units of four fill
    completely; a random layer (no shared sets) fills a quarter of them."""
    from jax_spdnn.challenge import radixnet

    s = radixnet(1024, 2, seed=0)[1].structure
    for units in sd.sparse.SHARED_SET_UNITS:
        p = s.shared_sets(units)
        assert p.fill == 1.0 and p.perm.shape == (1024,) and s.shared_sets(units) is p
    rng = np.random.default_rng(0)
    m = sd.SparseMatrix.from_scipy(random_sparse(rng, 512, 512, 0.05))
    assert m.structure.shared_sets(4).fill < 0.3
    with pytest.raises(ValueError, match="units"):
        sd.pack_shared_sets(s, 3)


def test_stationary_bank_schedule():
    """On a random layer the schedule nearly halves the shared-memory accesses per warp
    step (3.5 in CSR order); the pack is cached per structure; too many inputs for 16-bit
    indices is an error naming the limit."""
    rng = np.random.default_rng(0)
    n = 2048
    rows = np.argsort(rng.random((n, n)), axis=1)[:, :32].reshape(-1)  # 32 distinct per output
    cols = np.repeat(np.arange(n), 32)
    m = sd.SparseMatrix.from_scipy(sps.coo_matrix((np.ones(n * 32), (rows, cols)), (n, n)))
    plain, sched = m.structure.stationary(False), m.structure.stationary()
    assert not plain.scheduled and sched.scheduled
    assert plain.conflicts > 3.0 and sched.conflicts < 2.0
    assert m.structure.stationary() is sched
    big = sd.SparseMatrix.from_scipy(sps.csc_matrix((70000, 2)))
    with pytest.raises(ValueError, match="16-bit"):
        sd.pack_stationary(big.structure)


@pytest.mark.parametrize("kind", ["sliced_ell", "footprint", "bank_split", "stationary"])
def test_pack_values_many_equals_per_layer(kind):
    """One gather over several layers gives each layer's packed values, concatenated
    (padding zero), for every packing; an empty layer list gives an empty array."""
    from jax_spdnn.sparse import pack_values_many

    rng = np.random.default_rng(7)
    shapes = [(40, 70), (70, 33), (33, 33), (33, 1)]
    mats = [
        sd.SparseMatrix.from_scipy(random_sparse(rng, a, b, 0.15, empty_rows=0.2))
        for a, b in shapes
    ]
    pack = {
        "sliced_ell": lambda s: s.sliced_ell,
        "footprint": lambda s: s.footprint(256),
        "bank_split": lambda s: s.bank_split(2),
        "stationary": lambda s: s.stationary(),
    }[kind]
    packs = [pack(W.structure) for W in mats]
    got = pack_values_many(packs, [W.values for W in mats], jnp.float64)
    want = np.concatenate([np.asarray(p.pack_values(W.values)) for p, W in zip(packs, mats)])
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(got), want)
    assert pack_values_many([], [], jnp.float32).shape == (0,)
