"""Streaming whole networks whose weights do not fit in device memory.

:func:`stream_network` runs ``Y <- min(relu(Y W_l + b_l), clip)`` over ``L`` layers in chunks
of ``chunk_layers`` layers. The features stay on the device. Each chunk's weights are made on
the host (from a list of layers, or by a function that builds layer ``k`` on demand, so the
network never has to exist in host memory at once) and packed for the device's kernel by a
background thread while the device runs the previous chunk; the copy to the device is
asynchronous too, so making, packing and copying the next chunk overlap the compute. Each
chunk is one call of the same fused network kernel as :class:`~jax_spdnn.SparseDNN` (dead
rows skipped on the device within the chunk, found again at the next chunk's start), and the
index arrays enter as *arguments*: chunks of equal shape share one compiled program.

Networks too large to make on the host at all can be made on the device: a *device layer
source* (for example :class:`jax_spdnn.challenge.RadixNetLayers`) has ``degree`` (nonzeros
per output neuron, equal for all), ``chunk_inputs(a, b)`` (small host arrays, made on the
worker thread) and a traceable ``build_chunk(inputs, dtype) -> (indices, values)`` of shape
``[b - a, n, degree]`` (each output's inputs, ascending).  The chunk is then built and
packed for the kernel by one jitted program on the device(s) that run it, and only the small
inputs cross the host link.

Results equal :class:`~jax_spdnn.SparseDNN` with the layer or footprint kernel, bit for bit (on
CUDA chunks run the footprint kernel from ``FOOTPRINT_MIN_N`` on, like ``SparseDNN``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jax_spdnn import _native
from jax_spdnn.dnn import (
    _CPU_TARGET,
    _CUDA_TARGET,
    DNNResult,
    SparseDNN,
    _call_cpu,
    _call_cuda_ell,
    _call_cuda_fp,
    _cuda_options,
    _fp_layout,
    _tail_operands,
    footprint_applies,
    tail_options,
    tail_schedule,
)
from jax_spdnn.linear import _acc_dtype, _check_features
from jax_spdnn.sparse import (
    ELL_PAD_INDEX,
    ELL_SLICE,
    ORDER_KEYS,
    SparseMatrix,
    footprint_group,
    mix_inputs,
)

__all__ = ["stream_network"]


@partial(jax.jit, static_argnames=("clip", "drop_dead"))
def _chunk_cpu(x, values, biases, indptr, indices, *, clip, drop_dead):
    return _call_cpu(x, values, biases, indptr, indices, clip, drop_dead)


def _call_cuda(
    x,
    ops,
    *,
    clip,
    drop_dead,
    sp_off,
    ell_off,
    fp_off=None,
    group=None,
    tail=None,
    alias=False,
):
    """One chunk's CUDA network call: the layer kernel's operands ``(values, biases,
    slice_ptr, indices)``, or with ``fp_off`` the footprint kernel's (``+ perm, fp_ptr,
    fp_cols``), and with ``tail = (tail_start, ends, units)`` the stationary tail's four
    operands after those (see :func:`jax_spdnn.dnn._tail_operands`)."""
    if fp_off is None:
        return _call_cuda_ell(x, *ops, sp_off, ell_off, clip, drop_dead, alias=alias)
    t = None if tail is None else (*ops[7:11], *tail)
    return _call_cuda_fp(
        x, *ops[:7], sp_off, ell_off, fp_off, clip, drop_dead, group, alias=alias, tail=t
    )


def _cuda_chunk(x, *ops, **static):
    return _call_cuda(x, ops, **static)


def _cuda_chunk_in_place(x, *ops, **static):
    return _call_cuda(x, ops, alias=True, **static)


_CUDA_STATIC = ("clip", "drop_dead", "sp_off", "ell_off", "fp_off", "group", "tail")
# The first chunk must not consume the caller's x; later chunks write their output into
# the previous chunk's (donated) feature buffer, so a chunk holds one feature array plus
# the kernel's work buffers (60000 x 65536 float32 is 14.6 GiB).
_chunk_cuda_first = jax.jit(_cuda_chunk, static_argnames=_CUDA_STATIC)
_chunk_cuda = jax.jit(_cuda_chunk_in_place, static_argnames=_CUDA_STATIC, donate_argnums=(0,))


@lru_cache(maxsize=64)
def _sharded_chunk(
    platform: str,
    mesh: Mesh,
    axis: str,
    clip,
    drop_dead,
    sp_off=(),
    ell_off=(),
    fp_off=None,
    group=None,
    tail=None,
):
    """One chunk over ``mesh``: rows split along ``axis``, operands replicated."""
    n_ops = (7 if tail is None else 11) if platform == "cuda-fp" else 4

    def body(h, *ops):
        if platform == "cpu":
            y, active = _call_cpu(h, *ops, clip, drop_dead)
        else:
            static = dict(sp_off=sp_off, ell_off=ell_off, fp_off=fp_off, group=group, tail=tail)
            y, active = _call_cuda(h, ops, clip=clip, drop_dead=drop_dead, **static)
        return y, lax.psum(active, axis)

    specs = (P(axis),) + (P(),) * n_ops
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(axis), P())))


def _is_device_source(layers) -> bool:
    return all(hasattr(layers, a) for a in ("degree", "chunk_inputs", "build_chunk"))


def _pack_uniform(indices, values, platform: str):
    """``[m, n, d]`` per-output inputs and values of ``m`` layers -> the kernel's operands
    (traceable; the same arrays as the host packing of those layers, concatenated)."""
    if platform == "cuda-fp":
        return _pack_footprint_uniform(indices, values, footprint_group())
    m, n, d = indices.shape
    if platform == "cpu":  # CSR of W^T per layer
        indptr = jnp.tile(jnp.arange(n + 1, dtype=jnp.int32) * d, m)
        return values.reshape(-1), indptr, indices.reshape(-1)
    pad = (-n) % ELL_SLICE  # sliced ELL, slot-major; a partial last slice is padded
    if pad:
        indices = jnp.pad(indices, ((0, 0), (0, pad), (0, 0)), constant_values=ELL_PAD_INDEX)
        values = jnp.pad(values, ((0, 0), (0, pad), (0, 0)))
    slices = (n + pad) // ELL_SLICE

    def slot_major(a):
        return a.reshape(m, slices, ELL_SLICE, d).transpose(0, 1, 3, 2).reshape(-1)

    slice_ptr = jnp.tile(jnp.arange(slices + 1, dtype=jnp.int32) * (ELL_SLICE * d), m)
    return slot_major(values), slice_ptr, slot_major(indices)


def _footprint_order(indices):
    """``[n, d]`` each output's inputs (ascending) -> the footprint packing's output order
    (its ``perm``): by the first inputs, then a hash of them all (traceable)."""
    n, d = indices.shape
    keys = [indices[:, i] for i in range(min(d, ORDER_KEYS))]
    h = jnp.sum(mix_inputs(indices), axis=1, dtype=jnp.uint32)
    iota = lax.iota(jnp.int32, n)
    return lax.sort((*keys, h, iota), num_keys=len(keys) + 2)[-1]


def _footprint_layer(indices, values, G: int):
    """One ``[n, d]`` layer (each output's inputs, ascending) -> its footprint packing as
    :func:`jax_spdnn.sparse.pack_footprint` makes it (traceable): the reordered ``[n, d]``
    footprint slots and values, ``perm [n]``, ``fp_ptr [groups + 1]`` and ``fp_cols``
    (``groups * G * d`` long; the tail past ``fp_ptr[-1]`` is zero)."""
    n, d = indices.shape
    groups = -(-n // G)
    perm = _footprint_order(indices)
    idx = jnp.pad(indices[perm], ((0, groups * G - n), (0, 0)), constant_values=ELL_PAD_INDEX)
    idx = idx.reshape(groups, G * d)
    where = lax.broadcasted_iota(jnp.int32, idx.shape, 1)
    srt, at = lax.sort((idx, where), dimension=1, num_keys=1)
    prev = jnp.pad(srt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    first = (srt != prev) & (srt != ELL_PAD_INDEX)
    rank = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
    fp_ptr = jnp.concatenate(
        [jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.sum(first, axis=1, dtype=jnp.int32))]
    )
    rows = lax.broadcasted_iota(jnp.int32, idx.shape, 0)
    slots = jnp.where(srt == ELL_PAD_INDEX, ELL_PAD_INDEX, rank)
    slots = jnp.zeros_like(idx).at[rows, at].set(slots, unique_indices=True)
    dest = jnp.where(first, fp_ptr[:-1, None] + rank, idx.size)
    fp_cols = (
        jnp.zeros(idx.size, jnp.int32)
        .at[dest.reshape(-1)]
        .set(srt.reshape(-1), mode="drop", unique_indices=True)
    )
    slots = slots.reshape(groups * G, d)[:n]
    return slots, values[perm], perm, fp_ptr, fp_cols


def _pack_footprint_uniform(indices, values, group: int):
    """``[m, n, d]`` per-output inputs and values -> the footprint kernel's operands
    (traceable; per layer the same arrays as :func:`jax_spdnn.sparse.pack_footprint`, the
    footprint lists at a fixed stride, see :func:`_uniform_offsets`)."""
    m, n, d = indices.shape
    # Layers in batches of up to ~2^22 nonzeros: one sort per batch rather than a loop of
    # small kernels per layer (120 layers of 1024 one by one took ~15 ms on an H100, more
    # than the chunk's network), with the sorts' scratch bounded at large n.
    batch = int(max(1, min(m, (1 << 22) // max(1, n * d))))
    slots, vals, perm, fp_ptr, fp_cols = lax.map(
        lambda a: _footprint_layer(*a, group), (indices, values), batch_size=batch
    )
    ell_values, slice_ptr, ell_slots = _pack_uniform(slots, vals, "cuda")
    return (
        ell_values,
        slice_ptr,
        ell_slots,
        perm.reshape(-1),
        fp_ptr.reshape(-1),
        fp_cols.reshape(-1),
    )


def _stationary_uniform(indices, values, order=None):
    """``[m, n, d]`` per-output inputs (ascending) and values -> the stationary tail's
    operands ``(values, indices, group_ptr, perm)`` in units of one output (traceable; the
    layout :func:`jax_spdnn.sparse.pack_shared_sets` makes with ``units=1``, outputs in
    their own order instead of footprint order, which changes no sum).

    Slots are the smallest ``1024 * 2**k >= n``; slice ``w`` (outputs ``32 w .. 32 w + 31``)
    has ``ceil(d / 4)`` groups of four steps; within a group, output ``j``'s step ``s``
    sits at ``group * 128 + 4 j + s``; padding (steps past ``d``, outputs past ``n``) reads
    the zero column ``n`` with value 0, and perm is -1 past ``n``.  With ``order [m, n]``
    (each layer's outputs in footprint order, as the footprint packing's perm), slot ``u``
    holds output ``order[u]``: outputs sharing inputs then sit in one warp, whose lanes
    read the same shared-memory words."""
    m, n, d = indices.shape
    if order is not None:
        indices = jnp.take_along_axis(indices, order[:, :, None], axis=1)
        values = jnp.take_along_axis(values, order[:, :, None], axis=1)
    slots = 1024
    while slots < n:
        slots *= 2
    q, slices = -(-d // 4), slots // 32
    pad = ((0, 0), (0, slots - n), (0, 4 * q - d))
    idx = jnp.pad(indices.astype(jnp.int32), pad, constant_values=n).astype(jnp.uint16)
    val = jnp.pad(values.astype(jnp.float32), pad)

    def layout(a):  # [m, slots, 4q] -> [m, slices, q groups, 32 outputs, 4 steps]
        return a.reshape(m, slices, 32, q, 4).transpose(0, 1, 3, 2, 4).reshape(-1)

    per_layer = slices * q
    group_ptr = (
        lax.broadcasted_iota(jnp.int32, (m, slices + 1), 0) * per_layer
        + lax.broadcasted_iota(jnp.int32, (m, slices + 1), 1) * q
    )
    slot = lax.broadcasted_iota(jnp.int32, (m, slots), 1)
    out = slot if order is None else jnp.pad(order.astype(jnp.int32), ((0, 0), (0, slots - n)))
    perm = jnp.where(slot < n, out, -1)
    return layout(val), layout(idx), group_ptr.reshape(-1), perm.reshape(-1)


def _uniform_offsets(m: int, n: int, d: int, footprint: bool = False) -> dict:
    """The CUDA kernels' per-layer offsets into :func:`_pack_uniform`'s arrays."""
    slices = -(-n // ELL_SLICE)
    offsets = {
        "sp_off": tuple(k * (slices + 1) for k in range(m)),
        "ell_off": tuple(k * slices * ELL_SLICE * d for k in range(m + 1)),
    }
    if footprint:
        group = footprint_group()
        stride = -(-n // group) * group * d
        offsets["fp_off"] = tuple(k * stride for k in range(m + 1))
        offsets["group"] = group
    return offsets


# Up to this width a chunk whose every layer runs on the stationary kernel is made without
# the footprint packing (the kernel's fallback): a 16-row tile of 1024 features (82 KB)
# fits the shared memory of every device the CUDA kernels are built for (sm_80 and up).
_TAIL_ONLY_MAX_N = 1024


@lru_cache(maxsize=64)
def _device_chunk(build, platform: str, dtype, sharding, tail_start=None, footprint=True):
    """Builds and packs a chunk of a device layer source where ``sharding`` puts it (with
    ``tail_start``, also the stationary tail's operands for its layers from there on;
    without ``footprint``, empty footprint operands: the tail runs every layer)."""

    def make(inputs):
        indices, values = build(inputs, dtype)
        if not footprint:
            order = jax.vmap(_footprint_order)(indices)
            empty = (jnp.zeros((0,), values.dtype),) + (jnp.zeros((0,), jnp.int32),) * 5
            return (*empty, *_stationary_uniform(indices, values, order))
        ops = _pack_uniform(indices, values, platform)
        if tail_start is None:
            return ops
        m, n, _ = indices.shape
        order = ops[3].reshape(m, n)[tail_start:]  # the footprint packing's output order
        tail = _stationary_uniform(indices[tail_start:], values[tail_start:], order)
        return (*ops, *tail)

    return jax.jit(make, in_shardings=sharding, out_shardings=sharding)


# Per device layer source, the (width, layers, input shapes) whose built shape was checked:
# kept across calls, as the check traces the source's build (~20 ms at N = 1024, once per
# chunk shape: more than a chunk's device time when it ran at every call).
_CHECKED = weakref.WeakKeyDictionary()


def _checked_shapes(source) -> set:
    try:
        return _CHECKED.setdefault(source, set())
    except TypeError:  # not weakly referable or not hashable: checked per call
        return set()


def _check_built_shape(source, inputs, dtype, bounds, n: int, checked: set) -> None:
    """A device source's chunk must be ``[layers, n, degree]`` (traced once per input shape;
    the kernel trusts the packed indices)."""
    key = (n, bounds[1] - bounds[0], str(jax.tree.map(np.shape, inputs)))
    if key in checked:
        return
    built = tuple(jax.eval_shape(lambda inp: source.build_chunk(inp, dtype), inputs)[0].shape)
    want = (bounds[1] - bounds[0], n, int(source.degree))
    if built != want:
        raise ValueError(
            f"stream_network: the layer source built inputs of shape {built} for features of "
            f"width {n}; layers {tuple(bounds)} need {want} ([layers, n, degree])"
        )
    checked.add(key)


def _layer_source(layers, n_layers):
    if _is_device_source(layers):
        if n_layers is not None and n_layers != len(layers):
            raise ValueError(
                f"stream_network: n_layers={n_layers} but the source has {len(layers)}"
            )
        return layers.__getitem__, len(layers)
    if callable(layers):
        if n_layers is None:
            raise ValueError("stream_network: n_layers is required when layers is a function")
        return layers, int(n_layers)
    layers = list(layers)
    if n_layers is not None and n_layers != len(layers):
        raise ValueError(f"stream_network: n_layers={n_layers} but {len(layers)} layers given")
    return layers.__getitem__, len(layers)


def _bias_source(biases, n_layers: int, n: int):
    if callable(biases):
        return biases
    b = np.asarray(biases)
    if b.ndim == 0:
        return lambda k: b
    if b.shape == (n_layers,) and n_layers != n:
        return lambda k: b[k]
    if b.shape == (n,):
        return lambda k: b
    if b.shape == (n_layers, n):
        return lambda k: b[k]
    raise ValueError(
        f"stream_network: biases must be a scalar, [L]={n_layers}, [n]={n}, [L, n] or a "
        f"function of the layer, got shape {b.shape}"
    )


def _platform_of(device, n: int) -> str:
    """Which network call runs chunks of width ``n`` on ``device``: "cpu", "cuda" (the
    layer kernel), "cuda-fp" (the footprint kernel) or "other" (a chain of layers)."""
    platform = device.platform
    if platform == "cpu" and _native.has_target(_CPU_TARGET, "cpu"):
        return "cpu"
    if platform in ("gpu", "cuda") and _native.has_target(_CUDA_TARGET, "cuda"):
        return "cuda-fp" if footprint_applies(n, _cuda_options()[0]) else "cuda"
    return "other"


def stream_network(
    layers: Sequence[SparseMatrix] | Callable[[int], SparseMatrix],
    x,
    biases,
    *,
    n_layers: int | None = None,
    clip: float | None = 32.0,
    chunk_layers: int = 120,
    drop_dead_rows: bool | None = None,
    mesh: Mesh | None = None,
    axis: str | None = None,
) -> DNNResult:
    """Runs a network of square sparse layers on ``x`` chunk by chunk (see the module doc).

    Args:
      layers: a sequence of :class:`SparseMatrix` ``[n, n]``, a function ``k ->
        SparseMatrix`` called once per layer, in order, from a background thread (for
        example ``lambda k: challenge.radixnet_layer(n, k + 1)``; then ``n_layers`` is
        required), or a device layer source (see the module doc), made on the device.
      x: ``[batch, n]`` features (float32, float64, bfloat16 or float16) on the device to run
        on.
      biases: a scalar, ``[L]``, ``[n]``, ``[L, n]``, or a function ``k -> scalar or [n]``.
      clip: upper clamp after the ReLU, or ``None``.
      chunk_layers: layers per device call; the device holds the weights of two chunks (the
        running one and the next; later chunks wait).
      drop_dead_rows: skip rows that became zero (default: per chunk, when its biases are
        all <= 0, the condition under which a zero row stays zero).
      mesh: split the rows over ``mesh``'s ``axis`` (default: its first) with
        ``jax.shard_map``; every chunk's weights are replicated on each device. Batches that
        do not divide the device count are padded with zero rows and trimmed.

    Returns:
      :class:`DNNResult` with the final features, the surviving rows and the active count
      after every layer.
    """
    get_layer, L = _layer_source(layers, n_layers)
    if L < 1:
        raise ValueError("stream_network: needs at least one layer")
    if chunk_layers < 1:
        raise ValueError(f"stream_network: chunk_layers must be >= 1, got {chunk_layers}")
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"stream_network: x must be [batch, n], got shape {x.shape}")
    _check_features(x, "stream_network")
    batch, n = x.shape
    get_bias = _bias_source(biases, L, n)
    acc = np.dtype(_acc_dtype(x.dtype))
    if mesh is None:
        device = next(iter(x.devices()))
        platform = _platform_of(device, n)
        x = jax.device_put(x, device)  # committed, like every later chunk's input: one program
        where = SingleDeviceSharding(device)
    else:
        axis = axis or mesh.axis_names[0]
        platform = _platform_of(mesh.devices.flat[0], n)
        if platform == "other":
            raise ValueError("stream_network: a mesh needs the CPU or CUDA network kernels")
        pad = (-batch) % mesh.shape[axis]
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, n), x.dtype)])
        x = jax.device_put(x, NamedSharding(mesh, P(axis)))
        device = where = NamedSharding(mesh, P())  # weights: a replica on every device
        probe = None  # one zero row standing for the padding rows (made where it runs)

    # The caller's JAX context (x64, default device) is thread-local: carry it into the
    # worker, where layers are made (a layer function may create JAX arrays).
    x64 = jax.dtypes.canonicalize_dtype(np.float64) == np.float64  # effective settings
    default_device = next(iter(jnp.zeros(()).devices()))

    def build(a: int, b: int):
        with jax.enable_x64(x64), jax.default_device(default_device):
            return _build(a, b)

    on_device = _is_device_source(layers) and platform != "other"
    # The stationary tail, as in SparseDNN: the first chunk follows SparseDNN's schedule;
    # later chunks start with few rows, so by default the kernel runs them from their first
    # layer.  Device-made chunks pack it in units of one output (_stationary_uniform).
    tail_opts = tail_options() if platform == "cuda-fp" else None
    if on_device:
        checked = _checked_shapes(layers)  # input shapes whose built shape was checked

    def chunk_tail(a: int, b: int):
        """(tail_start, ends) of chunk [a, b) ((b - a, ()): none)."""
        opts = tail_opts
        if opts is not None and a > 0 and opts[0] < 0:
            opts = (0, *opts[1:])
        return tail_schedule(n, b - a, x.dtype, opts)

    def bias_row(k: int) -> np.ndarray:
        return np.broadcast_to(np.asarray(get_bias(k), acc), (n,))

    def drop_for(bias: np.ndarray) -> bool:
        return bool(np.all(bias <= 0)) if drop_dead_rows is None else bool(drop_dead_rows)

    def _build(a: int, b: int):
        """Host side of chunk [a, b): the layers and their packing for the kernel (or, for a
        device source, what the device makes them from)."""
        if on_device:
            bias = np.stack([bias_row(k) for k in range(a, b)])
            static = {"drop_dead": drop_for(bias)}
            if platform != "cpu":
                footprint = platform == "cuda-fp"
                static.update(_uniform_offsets(b - a, n, int(layers.degree), footprint))
                start, ends = chunk_tail(a, b)
                if ends:
                    static["tail"] = (start, ends, 1)
                if ends and start == 0 and n <= _TAIL_ONLY_MAX_N:  # no footprint packing
                    static.update(sp_off=(), ell_off=(), fp_off=())
            return (layers.chunk_inputs(a, b), bias), static
        mats, bias = [], np.empty((b - a, n), acc)
        for k in range(a, b):
            W = get_layer(k)
            if not isinstance(W, SparseMatrix):
                raise TypeError(
                    f"stream_network: layer {k} is {type(W).__name__}, not a SparseMatrix"
                )
            if W.shape != (n, n):
                raise ValueError(
                    f"stream_network: layer {k} has shape {W.shape}, expected {(n, n)}"
                )
            mats.append(W)
            bias[k - a] = bias_row(k)  # right after its layer (a bias may ask for it)
        drop = drop_for(bias)
        if platform == "cpu":
            indptr = np.concatenate([W.structure.indptr for W in mats])
            indices = np.concatenate([W.structure.indices for W in mats])
            values = np.concatenate([np.asarray(W.values, acc) for W in mats])
            return (values, bias, indptr, indices), {"drop_dead": drop}
        if platform == "cuda-fp":
            group = footprint_group()
            fps = [W.structure.footprint(group) for W in mats]
            values = np.concatenate(
                [
                    np.append(np.asarray(W.values, acc), acc.type(0))[fp.source]
                    for fp, W in zip(fps, mats)
                ]
            )
            index, offsets = _fp_layout(fps)
            static = {"drop_dead": drop, "group": group}
            static.update(zip(("sp_off", "ell_off", "fp_off"), offsets))
            start, ends = chunk_tail(a, b)
            if not ends:
                return (values, bias, *index), static
            *tail_ops, start, ends, units = _tail_operands(mats, start, ends, tail_opts[2])
            static["tail"] = (start, ends, units)
            return (values, bias, *index, *tail_ops), static
        if platform == "cuda":
            ells = [W.structure.sliced_ell for W in mats]
            slice_ptr = np.concatenate([e.slice_ptr for e in ells])
            indices = np.concatenate([e.indices for e in ells])
            values = np.concatenate(
                [
                    np.append(np.asarray(W.values, acc), acc.type(0))[e.source]
                    for e, W in zip(ells, mats)
                ]
            )
            sp_off = np.cumsum([0] + [e.slice_ptr.shape[0] for e in ells[:-1]])
            ell_off = np.cumsum([0] + [e.total for e in ells])
            static = {
                "drop_dead": drop,
                "sp_off": tuple(int(v) for v in sp_off),
                "ell_off": tuple(int(v) for v in ell_off),
            }
            return (values, bias, slice_ptr, indices), static
        return (mats, bias), {"drop_dead": drop}

    bounds = [(a, min(a + chunk_layers, L)) for a in range(0, L, chunk_layers)]
    h, actives = x, []
    # The worker thread makes and packs layers; every device call and transfer stays on
    # this thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(build, *bounds[0])
        for i, _ in enumerate(bounds):
            host, static = pending.result()
            if i + 1 < len(bounds):
                pending = pool.submit(build, *bounds[i + 1])  # overlaps this chunk's compute
            if i >= 2:  # at most two chunks' weights on the device: this one and the running
                actives[i - 2].block_until_ready()  # one (dispatch is asynchronous)
            if on_device:  # (values, a, b) made there; the biases copied
                _check_built_shape(layers, host[0], acc, bounds[i], n, checked)
                tail = static.get("tail")
                footprint = static.get("fp_off") != ()  # empty: the tail runs the whole chunk
                tail_start = None if tail is None else tail[0]
                make_chunk = _device_chunk(
                    layers.build_chunk, platform, acc, where, tail_start, footprint
                )
                values, *index = make_chunk(host[0])
                host = ops = (values, jax.device_put(host[1], device), *index)
            if mesh is not None:
                step = _sharded_chunk(platform, mesh, axis, clip, **static)
                ops = jax.device_put(host, device)
                h, active = step(h, *ops)
                if pad:  # the padding rows are zero rows: follow one and discount them
                    local = [o.addressable_shards[0].data for o in ops]
                    if probe is None:
                        probe = jax.device_put(jnp.zeros((1, n), x.dtype), *local[0].devices())
                    single = _chunk_cpu if platform == "cpu" else _chunk_cuda_first
                    probe, probe_active = single(probe, *local, clip=clip, **static)
                    active = active - pad * jax.device_put(probe_active, active.sharding)
            elif platform == "cpu":
                h, active = _chunk_cpu(h, *jax.device_put(host, device), clip=clip, **static)
            elif platform in ("cuda", "cuda-fp"):
                step = _chunk_cuda_first if i == 0 else _chunk_cuda
                h, active = step(h, *jax.device_put(host, device), clip=clip, **static)
            else:
                r = SparseDNN(host[0], host[1], clip=clip)(h, drop_dead_rows=static["drop_dead"])
                h, active = r.features, r.active_per_layer
            actives.append(active)
            del host
    if h.shape[0] != batch:
        h = h[:batch]  # the padding rows of a mesh run
    return DNNResult(h, jnp.any(h != 0, axis=1), jnp.concatenate(actives))
