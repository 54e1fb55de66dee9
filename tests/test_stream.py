"""stream_network: chunked whole-network inference equals SparseDNN bit for bit (same
kernel per layer), with layers from a list, made on demand, or made on the device by a
device layer source; every bias form, rows dying inside and between chunks; one compiled
program for chunks of equal shape; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_spdnn as sd
from jax_spdnn import stream
from jax_spdnn.challenge import (
    RadixNetLayers,
    challenge_bias,
    digit_inputs,
    radixnet,
    radixnet_layer,
    random_inputs,
    reference_inference,
)
from jax_spdnn.sparse import SparseMatrix


class RandomUniformLayers:
    """A device layer source that is not RadiX-Net: random layers with ``degree`` sorted
    distinct inputs per output (any ``n``, not only multiples of the warp slice)."""

    def __init__(self, n, n_layers, degree, seed=0):
        rng = np.random.default_rng(seed)
        self.n, self.degree = n, degree
        self.idx = np.sort(
            np.stack(
                [
                    rng.permuted(np.tile(np.arange(n), (n, 1)), axis=1)[:, :degree]
                    for _ in range(n_layers)
                ]
            ),
            axis=2,
        ).astype(np.int32)  # [L, n, d]
        self.val = rng.uniform(0.1, 0.5, self.idx.shape).astype(np.float32)

    def __len__(self):
        return self.idx.shape[0]

    def __getitem__(self, k):
        rows = np.repeat(np.arange(self.n), self.degree)  # output j's inputs: W[i, j]
        return SparseMatrix.from_triplets(
            self.idx[k].reshape(-1), rows, self.val[k].reshape(-1), (self.n, self.n)
        )

    def chunk_inputs(self, a, b):
        return {"idx": self.idx[a:b], "val": self.val[a:b]}

    def build_chunk(self, inputs, dtype):
        return inputs["idx"], inputs["val"].astype(dtype)


@pytest.fixture(autouse=True)
def _layer_kernel(monkeypatch):
    # The reference SparseDNN runs the layer kernel on every layer, like the stream.
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "layer")


def _use_kernel(device, kernel, monkeypatch):
    """Runs a test with a CUDA network kernel (the CPU has one: its footprint run is skipped)."""
    if kernel != "layer" and device.platform == "cpu":
        pytest.skip("the CPU has one network kernel")
    monkeypatch.setenv("SPDNN_DNN_KERNEL", kernel)


@pytest.mark.parametrize("kernel", ["layer", "footprint"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 12])
@pytest.mark.parametrize("source", ["list", "function"])
def test_equals_sparse_dnn(device, chunk, source, kernel, monkeypatch):
    _use_kernel(device, kernel, monkeypatch)
    n, L = 64, 10
    layers = radixnet(n, L, seed=4)
    x = random_inputs(n, 90, seed=2)
    want = sd.SparseDNN(layers, -0.3)(x)
    src = layers if source == "list" else (lambda k: radixnet_layer(n, k + 1, seed=4))
    got = sd.stream_network(src, x, -0.3, n_layers=L, chunk_layers=chunk)
    np.testing.assert_array_equal(np.asarray(got.features), np.asarray(want.features))
    np.testing.assert_array_equal(np.asarray(got.alive), np.asarray(want.alive))
    np.testing.assert_array_equal(
        np.asarray(got.active_per_layer), np.asarray(want.active_per_layer)
    )
    assert got.features.dtype == jnp.float32


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
@pytest.mark.parametrize("n, batch", [(1024, 700), (4096, 300)])
def test_stationary_tail_in_chunks(n, batch, monkeypatch):
    """Chunks of layers made on the host or on the device run the stationary tail (from the
    first chunk's head on, then from each later chunk's first layer): the footprint
    kernel's results bit for bit, and SparseDNN's."""
    monkeypatch.setenv("SPDNN_DNN_KERNEL", "footprint")
    layers = radixnet(n, 14, seed=3)
    x = digit_inputs(n, batch, seed=1).toarray()
    out = {}
    with jax.default_device(jax.devices("cuda")[0]):
        for tail in ("off", None):
            if tail is None:
                monkeypatch.delenv("SPDNN_FP_TAIL", raising=False)
            else:
                monkeypatch.setenv("SPDNN_FP_TAIL", tail)
            out[tail] = sd.stream_network(layers, x, challenge_bias(n), chunk_layers=5)
        made = RadixNetLayers(n, 14, seed=3)  # made on the device: units of one output
        on_device = sd.stream_network(made, x, challenge_bias(n), chunk_layers=5)
        want = sd.SparseDNN(layers, challenge_bias(n))(x)
    for got in (out[None], on_device, want):
        np.testing.assert_array_equal(np.asarray(got.features), np.asarray(out["off"].features))
        np.testing.assert_array_equal(np.asarray(got.alive), np.asarray(out["off"].alive))
        np.testing.assert_array_equal(
            np.asarray(got.active_per_layer), np.asarray(out["off"].active_per_layer)
        )
    assert 0 < int(want.active_per_layer[-1]) < batch


def test_matches_reference_and_bias_forms(device):
    n, L = 256, 7
    layers = radixnet(n, L, seed=1)
    x = random_inputs(n, 120, seed=6)
    b = -0.3 * np.ones((L, n))
    b[:, ::3] = -0.25
    ref = reference_inference(layers, list(b), x)
    forms = [b, lambda k: b[k]]
    for biases in forms:
        r = sd.stream_network(layers, x, biases, chunk_layers=3)
        check = sd.challenge.check_categories(r.categories(), ref.categories, ref.ambiguous)
        assert check.passed, check.summary()
    per_layer = -0.3 - 0.01 * np.arange(L)
    a = sd.stream_network(layers, x, per_layer, chunk_layers=2)
    w = sd.SparseDNN(layers, per_layer)(x)
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(w.features))
    shared = -0.3 * np.ones(n)
    a = sd.stream_network(layers, x, shared, chunk_layers=4)
    w = sd.SparseDNN(layers, shared)(x)
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(w.features))


def test_edge_cases(device):
    layers = radixnet(64, 6, seed=0)
    x = random_inputs(64, 50, seed=0)
    # every row dies in the first chunk; later chunks see none
    r = sd.stream_network(layers, x, -100.0, chunk_layers=2)
    assert not np.asarray(r.alive).any() and np.all(np.asarray(r.active_per_layer) == 0)
    # a positive bias in one chunk only: that chunk may not skip zero rows
    b = np.full(6, -0.3)
    b[4] = 0.5
    x0 = np.zeros((5, 64), np.float32)
    r = sd.stream_network(layers, x0, b, chunk_layers=2)
    want = sd.SparseDNN(layers, b)(x0)
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(want.features))
    assert np.asarray(r.alive).all()
    # batch 1, float64, bf16
    for dtype in (np.float32, np.float64, jnp.bfloat16):
        xs = jnp.asarray(x[:1], dtype)
        r = sd.stream_network(layers, xs, -0.3, chunk_layers=4)
        w = sd.SparseDNN(layers, -0.3)(xs)
        assert r.features.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(r.features), np.asarray(w.features))
    # the caller's x is left intact
    xd = jnp.asarray(x)
    before = np.asarray(xd).copy()
    sd.stream_network(layers, xd, -0.3, chunk_layers=2)
    np.testing.assert_array_equal(np.asarray(xd), before)


def test_one_program_per_chunk_shape():
    layers = radixnet(64, 9, seed=3)
    x = jax.device_put(random_inputs(64, 40, seed=1), jax.devices("cpu")[0])
    jax.clear_caches()
    sd.stream_network(layers, x, -0.3, chunk_layers=4)  # chunks of 4, 4 and 1 layers
    assert stream._chunk_cpu._cache_size() == 2


def test_errors():
    layers = radixnet(64, 3, seed=0)
    x = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="n_layers is required"):
        sd.stream_network(lambda k: layers[k], x, -0.3)
    with pytest.raises(ValueError, match="n_layers=5 but 3 layers"):
        sd.stream_network(layers, x, -0.3, n_layers=5)
    with pytest.raises(ValueError, match="chunk_layers must be >= 1"):
        sd.stream_network(layers, x, -0.3, chunk_layers=0)
    with pytest.raises(ValueError, match="x must be \\[batch, n\\]"):
        sd.stream_network(layers, x[0], -0.3)
    with pytest.raises(TypeError, match="int32"):
        sd.stream_network(layers, x.astype(np.int32), -0.3)
    with pytest.raises(ValueError, match="biases must be"):
        sd.stream_network(layers, x, np.zeros(7))
    with pytest.raises(ValueError, match="layer 1 has shape"):
        sd.stream_network([layers[0], radixnet(32, 1)[0]], x, -0.3)
    with pytest.raises(TypeError, match="layer 0 is ndarray"):
        sd.stream_network(lambda k: np.eye(64), x, -0.3, n_layers=1)


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
def test_cuda_chunk_lowering_without_a_gpu():
    """The CUDA chunk call lowers on any machine with the CUDA kernels built: the packed
    index arrays (the stationary tail's too) are arguments (not constants) and later chunks
    reuse the feature buffer."""
    import re

    from jax_spdnn.dnn import _tail_operands

    layers = radixnet(1024, 3, seed=0)
    ells = [W.structure.sliced_ell for W in layers]
    args = (
        jax.ShapeDtypeStruct((50, 1024), jnp.float32),
        np.zeros(sum(e.total for e in ells), np.float32),
        np.zeros((3, 1024), np.float32),
        np.concatenate([e.slice_ptr for e in ells]),
        np.concatenate([e.indices for e in ells]),
    )
    static = dict(
        clip=32.0,
        drop_dead=True,
        sp_off=tuple(int(v) for v in np.cumsum([0] + [e.slice_ptr.shape[0] for e in ells[:-1]])),
        ell_off=tuple(int(v) for v in np.cumsum([0] + [e.total for e in ells])),
    )
    fps = [W.structure.footprint(512) for W in layers]
    fp_args = args[:3] + tuple(
        np.concatenate([getattr(fp, a) for fp in fps])
        for a in ("slice_ptr", "indices", "perm", "fp_ptr", "fp_cols")
    )
    fp_static = dict(
        static,
        ell_off=tuple(int(v) for v in np.cumsum([0] + [fp.total for fp in fps])),
        fp_off=tuple(int(v) for v in np.cumsum([0] + [fp.staged for fp in fps])),
        group=512,
    )
    # the stationary tail's operands (values, 16-bit inputs, group_ptr, perm) as arguments
    *tail_ops, start, ends, units = _tail_operands(layers, 0, (2, 3), 0)
    tail_args = fp_args + (np.asarray(tail_ops[0]), *tail_ops[1:])
    tail_static = dict(fp_static, tail=(start, ends, units))
    # a chunk the tail runs whole: empty footprint operands and offsets
    empty = (np.zeros(0, np.float32), args[2]) + (np.zeros(0, np.int32),) * 5
    only_args = (args[0],) + empty + tail_args[8:]
    only_static = dict(tail_static, sp_off=(), ell_off=(), fp_off=())
    cases = [
        (args, static, "spdnn_sparse_dnn_ell"),
        (fp_args, fp_static, "spdnn_sparse_dnn_footprint"),
        (tail_args, tail_static, "spdnn_sparse_dnn_footprint"),
        (only_args, only_static, "spdnn_sparse_dnn_footprint"),
    ]
    for a, st_, target in cases:
        for fn, donated in ((stream._chunk_cuda_first, False), (stream._chunk_cuda, True)):
            text = fn.trace(*a, **st_).lower(lowering_platforms=("cuda",)).as_text()
            assert set(re.findall(r"custom_call @(\w+)", text)) == {target}
            assert len(re.findall(r"%arg\d+: tensor<", text)) == len(a)  # no index constants
            assert ("tf.aliasing_output" in text or "jax.buffer_donor" in text) == donated
            assert ("output_operand_aliases" in text) == donated  # the output takes x's buffer
            assert ("tail_ends = dense<[2, 3]>" in text) == ("tail" in st_)


@pytest.mark.gpu
@pytest.mark.skipif(not sd.cuda_available(), reason="needs a CUDA device and CUDA kernels")
def test_chunk_without_footprint_operands_needs_the_whole_tail():
    """Empty footprint operands are accepted only when the stationary tail runs every
    layer; otherwise the call fails with an error naming the problem."""
    from jax_spdnn.dnn import _tail_operands

    layers = radixnet(1024, 3, seed=0)
    x = jnp.asarray(random_inputs(1024, 40, seed=1), jnp.float32)
    bias = np.full((3, 1024), -0.3, np.float32)
    empty = (np.zeros(0, np.float32), bias) + (np.zeros(0, np.int32),) * 5
    static = dict(clip=32.0, drop_dead=True, sp_off=(), ell_off=(), fp_off=(), group=256)
    with jax.default_device(jax.devices("cuda")[0]):
        want = sd.SparseDNN(layers, -0.3)(x)
        *ops, start, ends, units = _tail_operands(layers, 0, (1, 3), 1)
        y, active = stream._chunk_cuda_first(x, *empty, *ops, tail=(start, ends, units), **static)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want.features))
        np.testing.assert_array_equal(np.asarray(active), np.asarray(want.active_per_layer))
        *ops, start, ends, units = _tail_operands(layers, 1, (2, 3), 1)
        with pytest.raises(Exception, match="footprint operands are required"):
            jax.block_until_ready(
                stream._chunk_cuda_first(x, *empty, *ops, tail=(start, ends, units), **static)
            )


@pytest.mark.parametrize("batch", [40, 37])
@pytest.mark.parametrize("bias", [-0.3, 0.05])
def test_mesh_equals_single_device(batch, bias):
    """Rows split over 4 CPU devices (weights replicated per chunk): the same features,
    survivors and active counts as one device, also when the batch does not divide the
    devices (padding rows are discounted, even with a positive bias that wakes them)."""
    from jax_spdnn import distributed as dist

    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 CPU devices (jax_num_cpu_devices)")
    mesh = dist.batch_mesh(cpus[:4])
    layers = radixnet(64, 7, seed=5)
    x = jax.device_put(random_inputs(64, batch, seed=3), cpus[0])
    x = x.at[-8:].set(0.0)  # some rows start dead: a device may hold none alive
    one = sd.stream_network(layers, x, bias, chunk_layers=3)
    many = sd.stream_network(layers, x, bias, chunk_layers=3, mesh=mesh)
    assert many.features.shape == (batch, 64)
    np.testing.assert_array_equal(np.asarray(many.features), np.asarray(one.features))
    np.testing.assert_array_equal(np.asarray(many.alive), np.asarray(one.alive))
    np.testing.assert_array_equal(
        np.asarray(many.active_per_layer), np.asarray(one.active_per_layer)
    )


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
def test_layer_function_sees_the_callers_x64_context():
    """Layers are made in a worker thread, but under the caller's x64 setting (a context
    manager is thread-local; the test suite enables x64 globally, so the caller turns it
    off here and the worker must follow)."""
    seen = []

    def make(k):
        W = radixnet(64, 3, seed=1)[k]
        W = W.with_values(jnp.asarray(W.values, jnp.float64))  # a JAX array, made here
        seen.append(np.asarray(W.values).dtype)
        return W

    x = random_inputs(64, 10, seed=0)
    with jax.enable_x64(False):
        r = sd.stream_network(make, x, -0.3, n_layers=3, chunk_layers=2)
        assert r.features.dtype == jnp.float32
    assert seen == [np.dtype(np.float32)] * 3


def test_radixnet_layers_sequence():
    src = RadixNetLayers(64, 9, seed=2)
    assert len(src) == 9 and src.nnz == 9 * 64 * 32
    for k in (0, 3, 8):
        np.testing.assert_array_equal(src[k].todense(), radixnet_layer(64, k + 1, seed=2).todense())
    np.testing.assert_array_equal(src[-1].todense(), src[8].todense())
    assert [W.shape for W in src[2:4]] == [(64, 64)] * 2
    with pytest.raises(IndexError):
        src[9]
    with pytest.raises(IndexError):
        src.chunk_inputs(3, 10)
    with pytest.raises(ValueError, match="N = 16"):
        RadixNetLayers(48, 3)
    assert src.max_abs_column_sum(0) == pytest.approx(np.abs(src[0].todense()).sum(axis=0).max())


@pytest.mark.parametrize("n,L,chunks", [(32, 4, [(0, 4), (2, 3)]), (256, 13, [(0, 13), (3, 9)])])
@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_device_chunk_equals_host_packing(n, L, chunks, platform):
    """The chunk made and packed on the device is the host packing of the same layers
    (block boundaries inside the chunk: N=32 starts a new permutation every layer)."""
    src = RadixNetLayers(n, L, seed=7)
    for a, b in chunks:
        inputs = src.chunk_inputs(a, b)
        values, ptr, idx = stream._pack_uniform(*src.build_chunk(inputs, jnp.float32), platform)
        layers = [radixnet_layer(n, k + 1, seed=7) for k in range(a, b)]
        if platform == "cpu":
            want = (
                np.concatenate([np.asarray(W.values) for W in layers]),
                np.concatenate([W.structure.indptr for W in layers]),
                np.concatenate([W.structure.indices for W in layers]),
            )
        else:
            ells = [W.structure.sliced_ell for W in layers]
            want = (
                np.concatenate([np.asarray(e.pack_values(W.values)) for e, W in zip(ells, layers)]),
                np.concatenate([e.slice_ptr for e in ells]),
                np.concatenate([e.indices for e in ells]),
            )
            off = stream._uniform_offsets(b - a, n, 32)
            assert list(off["ell_off"]) == list(np.cumsum([0] + [e.total for e in ells]))
            sp = np.cumsum([0] + [e.slice_ptr.shape[0] for e in ells[:-1]])
            assert list(off["sp_off"]) == list(sp)
        for got, w in zip((values, ptr, idx), want):
            np.testing.assert_array_equal(np.asarray(got), w)


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_uniform_packing_of_any_size(platform):
    """A generic uniform-degree source with n not a multiple of the 32-output slice packs
    like the host packing (padding slots included)."""
    src = RandomUniformLayers(45, 3, 5, seed=1)
    values, ptr, idx = stream._pack_uniform(
        *src.build_chunk(src.chunk_inputs(0, 3), jnp.float32), platform
    )
    layers = [src[k] for k in range(3)]
    if platform == "cpu":
        want_idx = np.concatenate([W.structure.indices for W in layers])
        want_val = np.concatenate([np.asarray(W.values) for W in layers])
    else:
        ells = [W.structure.sliced_ell for W in layers]
        want_idx = np.concatenate([e.indices for e in ells])
        want_val = np.concatenate(
            [np.asarray(e.pack_values(W.values)) for e, W in zip(ells, layers)]
        )
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_array_equal(np.asarray(values), want_val)


@pytest.mark.parametrize("group", ["256", "512"])
@pytest.mark.parametrize(
    "src", [RadixNetLayers(2048, 13, seed=2), RandomUniformLayers(1100, 3, 12, seed=3)]
)
def test_device_footprint_packing_equals_host(src, group, monkeypatch):
    """The footprint packing made on the device (any n, degrees past the order's leading
    keys, permuted RadiX-Net blocks) equals pack_footprint of the host layers, layer by
    layer at the offsets the kernel is given."""
    monkeypatch.setenv("SPDNN_FP_GROUP", group)
    L, n = len(src), src[0].n_out
    got = jax.jit(lambda i: stream._pack_uniform(*src.build_chunk(i, jnp.float32), "cuda-fp"))(
        src.chunk_inputs(0, L)
    )
    values, slice_ptr, slots, perm, fp_ptr, fp_cols = (np.asarray(a) for a in got)
    off = stream._uniform_offsets(L, n, src.degree, footprint=True)
    groups = -(-n // int(group))
    assert off["group"] == int(group)
    for k in range(L):
        W = src[k]
        fp = W.structure.footprint()
        e0, e1 = off["ell_off"][k], off["ell_off"][k + 1]
        sp0 = off["sp_off"][k]
        np.testing.assert_array_equal(perm[k * n : (k + 1) * n], fp.perm)
        np.testing.assert_array_equal(slice_ptr[sp0 : sp0 + fp.slice_ptr.size], fp.slice_ptr)
        np.testing.assert_array_equal(slots[e0:e1], fp.indices)
        np.testing.assert_array_equal(values[e0:e1], np.asarray(fp.pack_values(W.values)))
        np.testing.assert_array_equal(fp_ptr[k * (groups + 1) : (k + 1) * (groups + 1)], fp.fp_ptr)
        f0 = off["fp_off"][k]
        np.testing.assert_array_equal(fp_cols[f0 : f0 + fp.staged], fp.fp_cols)
        assert off["fp_off"][k + 1] - f0 >= fp.staged


@pytest.mark.parametrize("kernel", ["layer", "footprint"])
@pytest.mark.parametrize("make", ["radixnet", "random"])
def test_device_source_equals_host_layers(device, make, kernel, monkeypatch):
    _use_kernel(device, kernel, monkeypatch)
    n, L = (64, 11) if make == "radixnet" else (45, 6)
    src = RadixNetLayers(n, L, seed=4) if make == "radixnet" else RandomUniformLayers(n, L, 5)
    x = random_inputs(n, 70, seed=2)
    bias = -0.3 if make == "radixnet" else -0.05
    want = sd.stream_network([src[k] for k in range(L)], x, bias, chunk_layers=4)
    got = sd.stream_network(src, x, bias, chunk_layers=4)
    np.testing.assert_array_equal(np.asarray(got.features), np.asarray(want.features))
    np.testing.assert_array_equal(
        np.asarray(got.active_per_layer), np.asarray(want.active_per_layer)
    )
    assert np.asarray(got.active_per_layer)[-1] > 0  # something survives to compare
    with pytest.raises(ValueError, match="n_layers=3 but the source has"):
        sd.stream_network(src, x, -0.3, n_layers=3)
    wide = RadixNetLayers(2 * n, 2) if make == "radixnet" else RandomUniformLayers(n + 3, 2, 5)
    with pytest.raises(ValueError, match=f"for features of width {n}; layers"):
        sd.stream_network(wide, x, -0.3)


def test_built_shape_checked_once_per_source(monkeypatch):
    """The device source's built shape is traced once per chunk shape and width, not at
    every call (the trace cost more than a chunk's device time)."""
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = RadixNetLayers(64, 6, seed=1)
    x = random_inputs(64, 20, seed=1)
    first = sd.stream_network(src, x, -0.3, chunk_layers=3)
    n_first = len(calls)
    again = sd.stream_network(src, x, -0.3, chunk_layers=3)
    assert n_first >= 1 and len(calls) == n_first
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))


def test_device_source_on_a_mesh():
    from jax_spdnn import distributed as dist

    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 CPU devices (jax_num_cpu_devices)")
    src = RadixNetLayers(64, 8, seed=5)
    x = jax.device_put(random_inputs(64, 37, seed=3), cpus[0])
    one = sd.stream_network(list(src), x, -0.3, chunk_layers=3)
    many = sd.stream_network(src, x, -0.3, chunk_layers=3, mesh=dist.batch_mesh(cpus[:4]))
    np.testing.assert_array_equal(np.asarray(many.features), np.asarray(one.features))
    np.testing.assert_array_equal(
        np.asarray(many.active_per_layer), np.asarray(one.active_per_layer)
    )


@pytest.mark.parametrize(
    "src", [RadixNetLayers(1024, 3, seed=2), RandomUniformLayers(45, 2, 5, seed=3)]
)
@pytest.mark.parametrize("ordered", [False, True])
def test_stationary_uniform_packing(src, ordered):
    """The stationary tail's packing made on the device, decoded as the kernel walks it:
    every output's steps hold its inputs and values in order, padding reads the zero column
    with value 0, group_ptr is global over the layers and perm is -1 past n."""
    idx, val = src.build_chunk(src.chunk_inputs(0, len(src)), jnp.float32)
    idx, val = np.asarray(idx), np.asarray(val)
    m, n, d = idx.shape
    order = None
    if ordered:  # outputs in some order per layer (the footprint order in use)
        order = np.stack([np.random.default_rng(k).permutation(n) for k in range(m)])
    packed = stream._stationary_uniform(idx, val, None if order is None else jnp.asarray(order))
    values, indices, group_ptr, perm = (np.asarray(a) for a in packed)
    slots = perm.size // m
    assert slots in (1024, 2048, 4096) and slots >= n and indices.dtype == np.uint16
    assert values.size == indices.size and values.size % 128 == 0
    gp = group_ptr.reshape(m, slots // 32 + 1)
    assert gp[0, 0] == 0 and np.all(gp[1:, 0] == gp[:-1, -1]) and gp[-1, -1] * 128 == values.size
    v = np.arange(values.size)
    group, j, s = v // 128, v % 128 // 4, v % 4
    layer = np.searchsorted(gp[:, 0], group, side="right") - 1
    slice_ = np.array([np.searchsorted(gp[k], g, side="right") - 1 for k, g in zip(layer, group)])
    step = (group - gp[layer, slice_]) * 4 + s
    neuron = perm.reshape(m, slots)[layer, slice_ * 32 + j]
    real = (neuron >= 0) & (step < d)
    np.testing.assert_array_equal(indices[real], idx[layer[real], neuron[real], step[real]])
    np.testing.assert_array_equal(values[real], val[layer[real], neuron[real], step[real]])
    assert np.all(indices[~real] == n) and np.all(values[~real] == 0)
    want_perm = np.arange(n) if order is None else order[0]
    assert np.array_equal(perm.reshape(m, slots)[0, :n], want_perm)
    assert np.all(perm.reshape(m, slots)[:, n:] == -1)
    counts = np.bincount((layer * n + neuron)[real], minlength=m * n)
    assert np.all(counts == d)  # every step of every output, once


@pytest.mark.skipif(not sd._native.cuda_built(), reason="CUDA kernels not built")
def test_device_chunk_lowers_for_cuda_without_a_gpu():
    """Building a RadiX-Net chunk on the device lowers for CUDA: no layer arrays are
    constants of the program (only the small class arrays are arguments)."""
    import re

    src = RadixNetLayers(1024, 20, seed=0)
    inputs = src.chunk_inputs(0, 20)
    fn = jax.jit(lambda i: stream._pack_uniform(*src.build_chunk(i, jnp.float32), "cuda"))
    text = fn.trace(inputs).lower(lowering_platforms=("cuda",)).as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert len(re.findall(r"%arg\d+: tensor<", main)) == 3
    assert len(text) < 50_000  # the host-packed chunk would embed 655360 indices
    tail = jax.jit(lambda i: stream._stationary_uniform(*src.build_chunk(i, jnp.float32)))
    assert len(tail.trace(inputs).lower(lowering_platforms=("cuda",)).as_text()) < 50_000


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 5),
    n_layers=st.integers(1, 30),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_device_chunks_equal_host_layers_property(k, n_layers, data, seed):
    """Any N = 16 * 2^k, any chunk [a, b) of any network: the device-built inputs of every
    output are the host layer's, in order."""
    n = 16 << k
    src = RadixNetLayers(n, n_layers, seed=seed)
    a = data.draw(st.integers(0, n_layers - 1))
    b = data.draw(st.integers(a + 1, n_layers))
    idx, vals = src.build_chunk(src.chunk_inputs(a, b), jnp.float32)
    assert idx.shape == (b - a, n, 32) and vals.shape == idx.shape
    for layer in range(a, b):
        want = radixnet_layer(n, layer + 1, seed=seed).structure.indices.reshape(n, 32)
        np.testing.assert_array_equal(np.asarray(idx[layer - a]), want)
    np.testing.assert_array_equal(np.asarray(vals), np.float32(1 / 16))
