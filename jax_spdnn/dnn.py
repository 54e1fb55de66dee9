"""``SparseDNN``: a whole network of sparse layers run as one compiled program.

``Y <- min(relu(Y W_l + b_l), clip)`` for ``l = 1..L``, every ``W_l`` of shape ``[n, n]``.

With ReLU and biases ``<= 0`` a feature row that became all zero stays zero, so rows that die
can be skipped.  On the CPU and on CUDA the whole network is one FFI call that keeps an
active-row list on the device, with no host round trip: the CPU kernel compacts the list in
order after every layer; on CUDA the fused layer kernel (a persistent grid that reads the row
count from device memory) builds the next list itself, one atomic slot per surviving row (the
order of rows in the list varies, the results do not: rows are computed independently and
scattered back to their positions at the end).  From ``FOOTPRINT_MIN_N`` on, CUDA runs the
footprint kernel instead: outputs reordered so that a block stages only the inputs its
outputs use (:func:`jax_spdnn.sparse.pack_footprint`), rows in 32-row interleaved tiles,
listed in order after every layer; its results equal the layer kernel's bit for bit.  Its
float32 networks of up to ``TAIL_MAX_N`` neurons run their layers (all of them up to 2048
neurons, from ``TAIL_HEAD`` on above) on the stationary network kernel: a tile of rows stays
in shared memory for several layers per launch, outputs with equal input sets share each
staged value (:func:`jax_spdnn.sparse.pack_shared_sets`); again the same results.
Float32 networks from 8192 neurons on run the footprint layers in a tensor-core form
(dense 16 x 8 tiles made on the device, TF32 in three passes: float32 accuracy, not bitwise
the FMA kernel's results; :func:`jax_spdnn.sparse.tensor_core_tiles` tells which layers
fit, the others run on the FMA kernel; ``SPDNN_FP_MMA=0|1`` forces it off or on).
Other platforms run one jitted chain of fused ``sparse_linear`` layers over all rows.
All paths give the same results (the tensor-core form to float32 accuracy).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_spdnn import _native
from jax_spdnn.linear import _acc_dtype, _check_features, _match_vma, _vma, sparse_linear
from jax_spdnn.sparse import (
    SparseMatrix,
    Structure,
    footprint_group,
    gather_values,
    value_sources,
)

__all__ = ["DNNResult", "SparseDNN"]

_CPU_TARGET = "spdnn_sparse_dnn_csr"
_CUDA_TARGET = "spdnn_sparse_dnn_ell"
_CUDA_RESIDENT_TARGET = "spdnn_sparse_dnn_resident"
_CUDA_FOOTPRINT_TARGET = "spdnn_sparse_dnn_footprint"

# Schedule of the hybrid CUDA path: the first SINGLE_LAYERS layers one per launch with the
# layer kernel (rows die fast there and every launch compacts them; it is the faster kernel
# while rows are many), then segments of 2, 4, 8, ... layers, at most MAX_SEGMENT per
# launch, with the resident kernel (the row tile stays in shared memory across layers).
# SPDNN_DNN_SEGMENTS="singles,max" overrides both (tuning; singles=0 runs every layer on the
# resident kernel).  SPDNN_DNN_KERNEL=auto|footprint|layer|resident picks the CUDA path:
# auto runs the hybrid where it measured faster (n <= 1024: two lane groups or one; on H100
# 8% faster at 1024-120) and the footprint kernel for wider networks (it stages only the
# inputs a block's outputs use; benchmarks/RESULTS.md); footprint, layer and resident force
# one (resident: the hybrid, for any n up to 4096).
SINGLE_LAYERS = 8
MAX_SEGMENT = 32
KERNELS = ("auto", "footprint", "layer", "resident")
FOOTPRINT_MIN_N = 1024  # auto: the footprint kernel from this width on (timed faster at 1024+)
# The footprint path's tail: from layer TAIL_HEAD on, the stationary network kernel runs the
# remaining layers in launches of 2, 4, 8, ... layers, at most TAIL_MAX each, rows kept in
# shared memory (cuda/stationary_layers.cuh), for float32 features up to TAIL_MAX_N wide.
# With 16-row tiles (up to 2048 neurons) it runs every layer: on H100 1024-120 took
# 4.7 ms so against 5.0-5.3 ms from layer 8 on and 7.3 ms with footprint layers only; with
# 8-row tiles (4096-120) 24.8 ms from layer 8 on, 25.3 ms from layer 0, 30.0 ms without.
# Outputs with equal input sets go in units of TAIL_UNITS[0], else the next that fills at
# least TAIL_FILL of the units of every tail layer (jax_spdnn.sparse.pack_shared_sets).
# SPDNN_FP_TAIL="head,max[,units[,singles]]" overrides them ("off": the footprint kernel
# throughout).
TAIL_HEAD = {16: 0, 8: 8}  # by the kernel's tile height (16 rows up to 2048 slots)
TAIL_MAX = 32
TAIL_MAX_N = 4096
TAIL_SINGLES = 0  # launches of one layer (the rows that die are dropped after each)
TAIL_UNITS = (4, 2, 1)
TAIL_FILL = 0.9


def footprint_applies(n: int, kernel: str) -> bool:
    """Whether the CUDA network call uses the footprint kernel for width ``n``."""
    if not _native.has_target(_CUDA_FOOTPRINT_TARGET, "cuda"):
        return False
    return kernel == "footprint" or (kernel == "auto" and n >= FOOTPRINT_MIN_N)


def segment_ends(n_layers: int, singles: int = SINGLE_LAYERS, max_segment: int = MAX_SEGMENT):
    """Last layer (exclusive) of each launch of the resident kernel, as a tuple."""
    if singles < 0 or max_segment < 1:
        raise ValueError("segment_ends: singles must be >= 0 and max_segment >= 1")
    ends, end, size = [], 0, 1
    while end < n_layers:
        if end >= singles:
            size = min(2 * size, max_segment)
        end = min(n_layers, end + (1 if end < singles else size))
        ends.append(end)
    return tuple(ends)


def _cuda_options() -> tuple[str, tuple[int, int]]:
    kernel = os.environ.get("SPDNN_DNN_KERNEL", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"SPDNN_DNN_KERNEL must be one of {KERNELS}, got {kernel!r}")
    seg = os.environ.get("SPDNN_DNN_SEGMENTS")
    if seg:
        try:
            singles, max_segment = (int(v) for v in seg.split(","))
        except ValueError:
            raise ValueError(f"SPDNN_DNN_SEGMENTS must be 'singles,max', got {seg!r}") from None
    else:
        singles, max_segment = SINGLE_LAYERS, MAX_SEGMENT
    return kernel, (singles, max_segment)


def tail_options() -> tuple[int, int, int, int] | None:
    """The footprint path's stationary tail as ``(head, max_segment, units, singles)``
    (head -1: by the tile height, ``TAIL_HEAD``; units 0: chosen per network; singles:
    launches of one layer before the launches double, ``TAIL_SINGLES``), or None (off):
    ``(-1, TAIL_MAX, 0, TAIL_SINGLES)`` unless ``SPDNN_FP_TAIL`` says otherwise (read at
    trace time)."""
    value = os.environ.get("SPDNN_FP_TAIL")
    if value is None:
        return -1, TAIL_MAX, 0, TAIL_SINGLES
    if value == "off":
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
        if len(parts) not in (2, 3, 4):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"SPDNN_FP_TAIL must be 'off' or 'head,max[,units[,singles]]', got {value!r}"
        ) from None
    head, max_segment, units, singles = parts + (0, TAIL_SINGLES)[len(parts) - 2 :]
    if head < 0 or max_segment < 1 or units not in (0, *TAIL_UNITS) or singles < 0:
        raise ValueError(
            f"SPDNN_FP_TAIL: head must be >= 0, max >= 1, units one of {TAIL_UNITS} and "
            f"singles >= 0, got {value!r}"
        )
    return head, max_segment, units, singles


def tail_schedule(n: int, n_layers: int, dtype, options) -> tuple[int, tuple[int, ...]]:
    """``(tail_start, ends)``: the layers the stationary network kernel runs on the footprint
    path (``tail_start .. n_layers - 1``, launches ending at ``ends``) for ``options`` as
    :func:`tail_options` gives them, or ``(n_layers, ())`` where it does not apply (width
    above ``TAIL_MAX_N``, storage other than float32, or ``options`` None).  The kernel
    itself falls back to the footprint kernel where a tile does not fit the device's
    shared memory: the same results."""
    if options is None or n > TAIL_MAX_N or np.dtype(dtype) != np.float32:
        return n_layers, ()
    head, max_segment = options[:2]
    singles = options[3] if len(options) > 3 else 0
    if head < 0:  # 16-row tiles beat the footprint kernel from the first layer on (H100)
        head = TAIL_HEAD[16 if n <= 2048 else 8]
    if head >= n_layers:
        return n_layers, ()
    ends = segment_ends(n_layers, max(head, singles), max_segment)
    return head, tuple(e for e in ends if e > head)


def resident_groups(n: int) -> int | None:
    """Lane groups per warp of the resident kernel for width ``n`` (None: n too wide)."""
    for g in (1, 2, 4, 8):
        if n <= 512 * g:
            return g
    return None


@jax.tree_util.register_dataclass
@dataclass
class DNNResult:
    """Output of :meth:`SparseDNN.__call__`.

    Attributes:
      features: ``[batch, n]`` final features (rows that died are zero).
      alive: ``[batch] bool``, rows with any nonzero final feature (the challenge's categories).
      active_per_layer: ``[L] int32``, rows still active after each layer.
    """

    features: jax.Array
    alive: jax.Array
    active_per_layer: jax.Array

    def categories(self) -> np.ndarray:
        """0-based indices of the surviving rows (host array)."""
        return np.flatnonzero(np.asarray(self.alive))


@jax.tree_util.register_pytree_node_class
class SparseDNN:
    """A network of ``L`` sparse ``[n, n]`` layers with per-neuron biases and a clamp.

    Args:
      layers: sequence of :class:`SparseMatrix`, each ``[n, n]``.
      biases: a scalar, ``[L]`` (one scalar per layer), ``[n]`` (shared) or ``[L, n]``.
      clip: upper clamp after the ReLU (the challenge uses 32), or ``None``.

    Call it on ``x: [batch, n]`` (float32, float64, bfloat16 or float16) to get a
    :class:`DNNResult`.  The network is a pytree (layer values and biases are leaves).
    Layer values given as NumPy arrays are put on JAX's default device once, here: as
    host arrays they would be uploaded again at every call (at 1024-120 that upload took
    longer than the whole network on an H100).
    """

    def __init__(self, layers, biases, *, clip: float | None = 32.0):
        layers = list(layers)
        if not layers:
            raise ValueError("SparseDNN: needs at least one layer")
        for k, W in enumerate(layers):
            if not isinstance(W, SparseMatrix):
                raise TypeError(f"SparseDNN: layer {k} is {type(W).__name__}, not a SparseMatrix")
            if W.shape != layers[0].shape or W.n_in != W.n_out:
                raise ValueError(
                    f"SparseDNN: every layer must be square [n, n] with the same n; layer {k} "
                    f"has shape {W.shape}, layer 0 {layers[0].shape}"
                )
        n, L = layers[0].n_out, len(layers)
        b = jnp.asarray(biases)
        if b.ndim == 0:
            b = jnp.full((L, n), b)
        elif b.shape == (L,) and L != n:
            b = jnp.broadcast_to(b[:, None], (L, n))
        elif b.shape == (n,):
            b = jnp.broadcast_to(b, (L, n))
        elif b.shape != (L, n):
            raise ValueError(
                f"SparseDNN: biases must be a scalar, [L]={L}, [n]={n} or [L, n], got {b.shape}"
            )
        self.layers = [
            W
            if isinstance(W.values, jax.Array)
            else SparseMatrix.tree_unflatten(W.structure, (jnp.asarray(W.values),))
            for W in layers
        ]
        self.biases = b
        self.clip = None if clip is None else float(clip)
        # Decided once, while the biases are concrete, and carried as static metadata so
        # that calls under jit (where the biases are traced) still skip dead rows.
        try:
            self._nonpositive_bias = bool(np.all(np.asarray(b) <= 0))
        except jax.errors.TracerArrayConversionError:
            self._nonpositive_bias = False
        self._placed = {}

    def tree_flatten(self):
        return (self.layers, self.biases), (self.clip, self._nonpositive_bias)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.layers, obj.biases = children
        obj.clip, obj._nonpositive_bias = aux
        obj._placed = {}
        return obj

    @property
    def n(self) -> int:
        return self.layers[0].n_out

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nnz(self) -> int:
        """Total nonzeros over all layers (edges per input row)."""
        return sum(W.nnz for W in self.layers)

    def __repr__(self) -> str:
        return f"SparseDNN(n={self.n}, layers={self.n_layers}, nnz={self.nnz}, clip={self.clip})"

    def can_drop_dead_rows(self) -> bool:
        """Whether rows that became zero may be skipped: every bias was <= 0 when the
        network was built (biases traced at construction count as unknown: no)."""
        return self._nonpositive_bias

    def __call__(self, x, *, drop_dead_rows: bool | None = None) -> DNNResult:
        """Runs the network on ``x: [batch, n]``.

        ``drop_dead_rows`` (default: when every bias is <= 0) skips rows that became zero;
        only valid with non-positive biases, where a zero row stays zero.
        """
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"SparseDNN: x must be [batch, {self.n}], got {x.shape}")
        _check_features(x, "SparseDNN")
        if drop_dead_rows is None:
            drop_dead_rows = self.can_drop_dead_rows()
        kernel, segments = _cuda_options()
        tail = tail_options()
        placed = self._placed_operands(x, kernel, segments, tail)
        if placed is None:  # traced, on several devices, or a chain: operands as constants
            return _forward(
                self, x, drop_dead=bool(drop_dead_rows), kernel=kernel, segments=segments, tail=tail
            )
        path, arrays, static = placed
        return _forward_placed(
            self, x, arrays, path=path, static=static, drop_dead=bool(drop_dead_rows)
        )

    def _placed_operands(self, x, kernel, segments, tail):
        """``(path, device arrays, static)`` for a concrete ``x`` on one device, made and
        put on that device at the first call and kept with the network: the packed index
        arrays are then arguments of the compiled program instead of constants embedded in
        it (at 1024-120 that cut tracing and compiling from ~0.9 s to ~0.2 s on the CPU,
        and wider networks would carry GBs of constants).  None where ``x`` is traced or
        spans several devices (those take :func:`_forward`, which picks the branch when the
        program is lowered)."""
        if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
            return None
        devices = x.devices()
        if len(devices) != 1:
            return None
        (device,) = devices
        if device.platform == "cpu":
            path = "cpu" if _native.has_target(_CPU_TARGET, "cpu") else None
        elif device.platform in ("gpu", "cuda") and _native.cuda_built():
            path = _cuda_path(self, x.dtype, kernel)
        else:
            path = None
        if path is None:
            return None
        key = (path, np.dtype(x.dtype).name, kernel, segments, tail, footprint_group(), device)
        if key not in self._placed:
            arrays, static = _plan(self, path, x.dtype, kernel, segments, tail)
            self._placed[key] = (path, tuple(jax.device_put(arrays, device)), static)
        return self._placed[key]

    def profile_layers(self, x, *, repeats: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer active rows and seconds, for profiling (host-synchronized).

        Runs the layers one by one on the rows still active (dead rows dropped between
        layers, as the fused network does), each as a jitted ``sparse_linear`` on the
        default device, timed after a warm-up as the median of ``repeats`` calls.  The
        result is the cost profile of the layer kernel over the network.  The times include
        one dispatch per layer, which the fused :meth:`__call__` does not pay, and the fused
        kernels differ in detail (they compact rows in place), so their sum approximates the
        fused network's time rather than equalling it.  Returns ``(active_rows [L],
        seconds [L])``.
        """
        h = jnp.asarray(x)
        if h.ndim != 2 or h.shape[1] != self.n:
            raise ValueError(f"SparseDNN: x must be [batch, {self.n}], got {h.shape}")
        drop = self.can_drop_dead_rows()
        layer = jax.jit(partial(sparse_linear, activation="relu", clip=self.clip))
        if drop:
            h = h[np.flatnonzero(np.asarray(jnp.any(h != 0, axis=1)))]
        active, seconds = [], []
        for W, b in zip(self.layers, self.biases):
            jax.block_until_ready(layer(h, W, b))  # compile / warm up for this row count
            samples = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                out = jax.block_until_ready(layer(h, W, b))
                samples.append(time.perf_counter() - t0)
            seconds.append(float(np.median(samples)))
            alive = np.asarray(jnp.any(out != 0, axis=1))
            active.append(int(alive.sum()))
            h = out[np.flatnonzero(alive)] if drop else out
        return np.asarray(active, np.int64), np.asarray(seconds)


def _concat_structures(structures: tuple[Structure, ...]):
    indptr = np.concatenate([s.indptr for s in structures])
    indices = np.concatenate([s.indices for s in structures])
    return indptr, indices


def _chain(net: SparseDNN, x):
    actives = []
    for W, b in zip(net.layers, net.biases):
        x = sparse_linear(x, W, b, activation="relu", clip=net.clip)
        actives.append(jnp.sum(jnp.any(x != 0, axis=1)).astype(jnp.int32))
    return x, jnp.stack(actives)


def _like(x, shape, dtype):
    """A result type derived from x's aval, so shard_map's varying axes carry over."""
    return jax.typeof(x).update(shape=tuple(shape), dtype=jnp.dtype(dtype), weak_type=False)


def _operands(x, *arrays):
    """Makes every operand vary over the axes x varies over (inside shard_map)."""
    axes = _vma(x)
    arrays = tuple(jnp.asarray(a) for a in arrays)
    return tuple(_match_vma(a, axes) for a in arrays) if axes else arrays


def _clip_attr(clip):
    return np.float64(np.inf if clip is None else clip)


def _call_cpu(x, values, biases, indptr, indices, clip, drop_dead: bool):
    """The CPU network call on explicit operands (layers concatenated; biases [L, n])."""
    out = (_like(x, x.shape, x.dtype), _like(x, (biases.shape[0],), jnp.int32))
    return jax.ffi.ffi_call(_CPU_TARGET, out)(
        x,
        *_operands(x, values, biases, indptr, indices),
        clip=_clip_attr(clip),
        drop_dead=drop_dead,
    )


def _call_cuda_ell(
    x, values, biases, slice_ptr, indices, sp_off, ell_off, clip, drop_dead: bool, alias=False
):
    """The CUDA layer-kernel network call on explicit operands (ELL packed; biases [L, n]).

    With ``alias`` the output features take x's buffer (the kernel reads x only in its first
    layer and writes the output last): no extra ``[batch, n]`` buffer when x is donated
    (XLA copies x first when it is not)."""
    batch, n = x.shape
    out = (
        _like(x, x.shape, x.dtype),
        _like(x, (biases.shape[0],), jnp.int32),
        _like(x, (2 * batch * n,), x.dtype),  # ping-pong feature buffers
        _like(x, (6 * batch + 2,), jnp.int32),  # marks, row lists, counts
    )
    aliases = {0: 0} if alias else None
    y, active, _, _ = jax.ffi.ffi_call(_CUDA_TARGET, out, input_output_aliases=aliases)(
        x,
        *_operands(x, values, biases, slice_ptr, indices),
        clip=_clip_attr(clip),
        drop_dead=drop_dead,
        slice_offsets=np.asarray(sp_off, np.int64),
        ell_offsets=np.asarray(ell_off, np.int64),
    )
    return y, active


# Integers of scratch the footprint path's row compaction needs (kCompactScratch in
# cuda/footprint_layer.cuh: a ticket counter, a spare, then a count and a flag per block).
_COMPACT_SCRATCH = 2 + 2 * 128


def _call_cuda_fp(
    x,
    values,
    biases,
    slice_ptr,
    indices,
    perm,
    fp_ptr,
    fp_cols,
    sp_off,
    ell_off,
    fp_off,
    clip,
    drop_dead: bool,
    group: int,
    alias=False,
    tail=None,
    with_nonzero=False,
):
    """The CUDA footprint-kernel network call on explicit operands (see
    :func:`_fp_operands`; ``alias`` as in :func:`_call_cuda_ell`; ``tail``: the stationary
    tail as ``(values, indices, group_ptr, perm, tail_start, ends, units)``, see
    :func:`_tail_operands`).  Returns ``(y, active)``, with ``with_nonzero`` also the
    ``[batch] bool`` rows of y with a nonzero feature (found by the kernel while it writes
    them, instead of a pass over y)."""
    if tail is None:
        tail = (
            np.zeros(0, np.float32),
            np.zeros(0, np.uint16),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            biases.shape[0],
            (),
            1,
        )
    batch, n = x.shape
    batch32 = -(-batch // 32) * 32  # any tile height fits
    out = (
        _like(x, x.shape, x.dtype),
        _like(x, (biases.shape[0],), jnp.int32),
        _like(x, (batch,), jnp.bool_),  # rows with a nonzero final feature
        _like(x, (2 * batch32 * n,), x.dtype),  # ping-pong row-interleaved feature buffers
        _like(x, (5 * batch + 4 + _COMPACT_SCRATCH,), jnp.int32),  # marks, lists, counts
    )
    aliases = {0: 0} if alias else None
    call = jax.ffi.ffi_call(_CUDA_FOOTPRINT_TARGET, out, input_output_aliases=aliases)
    y, active, nonzero, _, _ = call(
        x,
        *_operands(x, values, biases, slice_ptr, indices, perm, fp_ptr, fp_cols, *tail[:4]),
        clip=_clip_attr(clip),
        drop_dead=drop_dead,
        group=np.int64(group),
        slice_offsets=np.asarray(sp_off, np.int64),
        ell_offsets=np.asarray(ell_off, np.int64),
        fp_offsets=np.asarray(fp_off, np.int64),
        tail_start=np.int64(tail[4]),
        tail_ends=np.asarray(tail[5], np.int64),
        tail_units=np.int64(tail[6]),
    )
    return (y, active, nonzero) if with_nonzero else (y, active)


def _fp_layout(fps):
    """Footprint packings of consecutive layers, concatenated for the kernel: the index
    arrays ``(slice_ptr, indices, perm, fp_ptr, fp_cols)`` and the per-layer offsets
    ``(sp_off, ell_off, fp_off)`` as tuples of ints (static)."""
    index = tuple(
        np.concatenate([getattr(fp, a) for fp in fps])
        for a in ("slice_ptr", "indices", "perm", "fp_ptr", "fp_cols")
    )
    offsets = (
        np.cumsum([0] + [fp.slice_ptr.shape[0] for fp in fps[:-1]]),
        np.cumsum([0] + [fp.total for fp in fps]),
        np.cumsum([0] + [fp.staged for fp in fps]),
    )
    return index, tuple(tuple(int(v) for v in off) for off in offsets)


def tail_units(layers, units: int = 0) -> int:
    """Outputs per unit of the stationary tail for these layers: the first of ``TAIL_UNITS``
    (only ``units``, when given) whose packings share one slot count the kernel is built
    for (2048 with units of four, else 4096) and, unless forced, are at least
    ``TAIL_FILL`` full in every layer; else 1, which always fits up to ``TAIL_MAX_N``."""
    for k in (units,) if units else TAIL_UNITS:
        packs = [W.structure.shared_sets(k) for W in layers]
        slots = {p.perm.shape[0] for p in packs}
        fits = len(slots) == 1 and max(slots) <= (2048 if k == 4 else 4096)
        if fits and (units or min(p.fill for p in packs) >= TAIL_FILL):
            return k
    return 1


def _tail_plan(layers, tail_start: int, ends: tuple[int, ...], units: int):
    """The host half of :func:`_tail_operands`: the value gather's sources, 16-bit input
    indices, group_ptr made global over the layers and perm ``[layers, slots]``, then
    ``(tail_start, ends, units)``."""
    layers = layers[tail_start:]
    k = tail_units(layers, units)
    packs = [W.structure.shared_sets(k) for W in layers]
    source = value_sources(packs)
    base = np.cumsum([0] + [p.total // 128 for p in packs[:-1]])
    group_ptr = np.concatenate([p.group_ptr + b for p, b in zip(packs, base)])
    if group_ptr[-1] * 128 >= 2**31:
        raise ValueError("SparseDNN: the stationary tail needs more than 2^31 slots")
    indices = np.concatenate([p.indices for p in packs])
    perm = np.concatenate([p.perm for p in packs])
    return (source, indices, group_ptr.astype(np.int32), perm), (tail_start, ends, k)


def _tail_operands(layers, tail_start: int, ends: tuple[int, ...], units: int):
    """The stationary tail's operands for ``layers[tail_start:]``: values (float32),
    16-bit input indices, group_ptr made global over the layers, perm ``[layers, slots]``,
    then the schedule and the unit size."""
    (source, *index), static = _tail_plan(layers, tail_start, ends, units)
    values = gather_values([W.values for W in layers[tail_start:]], source, jnp.float32)
    return (values, *index, *static)


# ---------------------------------------------------------------------------------------
# Plans: how a platform runs a network, split into host operands (index arrays and value
# gathers, made from the static structures once per network) and a traced call on them.
# Under jit the host operands are constants of the program; SparseDNN.__call__ on a concrete
# single-device input puts them on the device once and passes them as arguments instead.
# ---------------------------------------------------------------------------------------


def _cuda_path(net: SparseDNN, dtype, kernel: str) -> str | None:
    """Which CUDA network call runs ``net`` on features of ``dtype`` (None: a chain)."""
    if footprint_applies(net.n, kernel):
        return "cuda-fp"
    if _resident_applies(net, dtype, kernel) is not None:
        return "cuda-resident"
    if _native.has_target(_CUDA_TARGET, "cuda"):
        return "cuda-ell"
    return None


def _resident_applies(net: SparseDNN, dtype, kernel: str) -> int | None:
    """The resident kernel's lane groups when the hybrid path runs this network, else None."""
    if kernel in ("layer", "footprint") or not _native.has_target(_CUDA_RESIDENT_TARGET, "cuda"):
        return None
    if np.dtype(dtype) == np.float64:
        return None
    groups = resident_groups(net.n)
    if groups is None or (kernel == "auto" and groups > 2):
        return None
    steps = sum(int(W.structure.bank_split(groups).col_ptr[-1]) for W in net.layers)
    return groups if steps < 2**31 else None


def _ell_plan(layers):
    """Sliced-ELL host operands of consecutive layers: ``(sources, slice_ptr, indices)`` and
    the per-layer offsets ``(sp_off, ell_off)`` as tuples of ints."""
    ells = [W.structure.sliced_ell for W in layers]
    slice_ptr = np.concatenate([e.slice_ptr for e in ells] or [np.zeros(0, np.int32)])
    indices = np.concatenate([e.indices for e in ells] or [np.zeros(0, np.int32)])
    sp_off = np.cumsum([0] + [e.slice_ptr.shape[0] for e in ells[:-1]])[: len(ells)]
    ell_off = np.cumsum([0] + [e.total for e in ells])
    offsets = (tuple(int(v) for v in sp_off), tuple(int(v) for v in ell_off))
    return (value_sources(ells), slice_ptr, indices), offsets


def _plan(net: SparseDNN, path: str, dtype, kernel: str, segments, tail):
    """``(arrays, static)`` of ``path`` for ``net`` on features of ``dtype``: the host
    operands (NumPy) and the hashable settings :func:`_run` takes with them."""
    if path == "cpu":
        return _concat_structures(tuple(W.structure for W in net.layers)), ()
    if path == "cuda-fp":
        group = footprint_group()
        start, ends = tail_schedule(net.n, net.n_layers, dtype, tail)
        # Layers the tail runs still get footprint operands: where a tile does not fit the
        # device's shared memory the kernel runs them with the footprint kernel.
        fps = [W.structure.footprint(group) for W in net.layers]
        index, offsets = _fp_layout(fps)
        arrays, tail_static = (value_sources(fps), *index), None
        if ends:
            tail_arrays, tail_static = _tail_plan(net.layers, start, ends, tail[2])
            arrays += tail_arrays
        return arrays, (group, offsets, tail_static)
    if path == "cuda-ell":
        return _ell_plan(net.layers)
    if path == "cuda-resident":
        groups = _resident_applies(net, dtype, kernel)
        L = net.n_layers
        head = min(segments[0], L)
        ends = tuple(e for e in segment_ends(L, *segments) if e > head)
        ell_arrays, offsets = _ell_plan(net.layers[:head])
        packs = [W.structure.bank_split(groups) for W in net.layers[head:]]
        first = np.cumsum([0] + [int(p.col_ptr[-1]) for p in packs[:-1]])
        col_ptr = np.concatenate(
            [p.col_ptr + s for p, s in zip(packs, first)] or [np.zeros(0, np.int64)]
        ).astype(np.int32)
        bank_offsets = np.concatenate([p.offsets for p in packs] or [np.zeros(0, np.int32)])
        arrays = (*ell_arrays, value_sources(packs), bank_offsets, col_ptr)
        return arrays, (groups, head, offsets, ends)
    raise ValueError(f"unknown network path {path!r}")


def _run(path: str, net: SparseDNN, x, arrays, static, drop_dead: bool):
    """The network call of ``path`` on operands from :func:`_plan` (NumPy: constants of the
    program; device arrays: arguments).  Returns ``(y, active, alive)``."""
    if path == "cuda-fp":
        group, offsets, tail = static
        acc = _acc_dtype(x.dtype)
        source, *index = arrays[:6]
        values = gather_values([W.values for W in net.layers], source, acc)
        biases = net.biases.astype(acc)
        if tail is not None:
            tail_source, *tail_index = arrays[6:]
            tail_values = [W.values for W in net.layers[tail[0] :]]
            tail = (gather_values(tail_values, tail_source, jnp.float32), *tail_index, *tail)
        # the kernel reports the rows of y with a nonzero feature itself
        return _call_cuda_fp(
            x,
            values,
            biases,
            *index,
            *offsets,
            net.clip,
            drop_dead,
            group,
            tail=tail,
            with_nonzero=True,
        )
    if path == "cpu":
        acc = _acc_dtype(x.dtype)
        values = jnp.concatenate([jnp.asarray(W.values).astype(acc) for W in net.layers])
        indptr, indices = arrays
        biases = net.biases.astype(acc)
        y, active = _call_cpu(x, values, biases, indptr, indices, net.clip, drop_dead)
    elif path == "cuda-ell":
        acc = _acc_dtype(x.dtype)
        source, slice_ptr, indices = arrays
        values = gather_values([W.values for W in net.layers], source, acc)
        y, active = _call_cuda_ell(
            x, values, net.biases.astype(acc), slice_ptr, indices, *static, net.clip, drop_dead
        )
    elif path == "cuda-resident":
        y, active = _call_cuda_resident(net, x, arrays, static, drop_dead)
    elif path == "chain":
        y, active = _chain(net, x)
    else:
        raise ValueError(f"unknown network path {path!r}")
    return y, active, jnp.any(y != 0, axis=1)


def _call_cuda_resident(net: SparseDNN, x, arrays, static, drop_dead: bool):
    groups, head, (sp_off, ell_off), ends = static
    ell_source, slice_ptr, ell_indices, bank_source, bank_offsets, col_ptr = arrays
    L = net.n_layers
    ell_values = gather_values([W.values for W in net.layers[:head]], ell_source, jnp.float32)
    values = gather_values([W.values for W in net.layers[head:]], bank_source, jnp.float32)
    # {offset, weight bits} pairs: one 16-byte vector holds two steps of a lane group.
    entries = jnp.stack(
        [jnp.asarray(bank_offsets), lax.bitcast_convert_type(values, jnp.int32)], axis=1
    ).reshape(-1)
    batch, n = x.shape
    out = (
        _like(x, x.shape, x.dtype),
        _like(x, (L,), jnp.int32),
        _like(x, (2 * batch * n,), x.dtype),  # ping-pong feature buffers
        _like(x, (6 * batch + L + 1,), jnp.int32),  # marks, row lists, counts
    )
    y, active, _, _ = jax.ffi.ffi_call(_CUDA_RESIDENT_TARGET, out)(
        x,
        *_operands(
            x,
            net.biases.astype(jnp.float32),
            ell_values,
            slice_ptr,
            ell_indices,
            entries,
            col_ptr,
        ),
        clip=_clip_attr(net.clip),
        drop_dead=drop_dead,
        groups=np.int64(groups),
        slice_offsets=np.asarray(sp_off, np.int64),
        ell_offsets=np.asarray(ell_off, np.int64),
        segment_ends=np.asarray(ends, np.int64),
    )
    return y, active


@partial(jax.jit, static_argnames=("drop_dead", "kernel", "segments", "tail"))
def _forward(
    net: SparseDNN,
    x,
    *,
    drop_dead: bool,
    kernel: str = "auto",
    segments=(SINGLE_LAYERS, MAX_SEGMENT),
    tail=(-1, TAIL_MAX, 0, TAIL_SINGLES),
) -> DNNResult:
    """The network on any platform, host operands as constants (the branch is picked when
    the program is lowered for its platform)."""

    def branch(path):
        def f(x):
            # The resident kernel's packing (bank-split offsets) is only made when it runs.
            arrays, static = _plan(net, path, x.dtype, kernel, segments, tail)
            return _run(path, net, x, arrays, static, drop_dead)

        return f

    branches = {}
    if _native.has_target(_CPU_TARGET, "cpu"):
        branches["cpu"] = branch("cpu")
    if (path := _cuda_path(net, x.dtype, kernel)) is not None:
        branches["cuda"] = branch(path)
    default = lambda x: _run("chain", net, x, (), (), drop_dead)  # noqa: E731
    y, active, alive = lax.platform_dependent(x, **branches, default=default)
    return DNNResult(y, alive, active)


@partial(jax.jit, static_argnames=("path", "static", "drop_dead"))
def _forward_placed(net: SparseDNN, x, arrays, *, path: str, static, drop_dead: bool):
    """The network on one known platform, host operands passed in as device arrays."""
    y, active, alive = _run(path, net, x, arrays, static, drop_dead)
    return DNNResult(y, alive, active)
