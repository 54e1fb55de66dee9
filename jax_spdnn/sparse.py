"""Sparse weight containers: :class:`SparseMatrix` for fully connected layers.

A ``SparseMatrix`` holds a weight matrix ``W`` of shape ``[n_in, n_out]`` (so
that a layer computes ``x @ W`` as in ``jnp.dot``) stored *by output neuron*:
the CSR form of ``W^T``.  Row ``j`` of the structure lists the input neurons
feeding output ``j``, with column indices sorted.  This is the layout the fused
kernels read.

The index structure (``indptr``, ``indices``) is static metadata, hashed by
content so ``jax.jit`` caches on it; the nonzero ``values`` are the only pytree
leaf, so ``jit`` traces over them and ``jax.grad`` differentiates them.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sps

__all__ = [
    "BankSplitPack",
    "EllPack",
    "FootprintPack",
    "SparseMatrix",
    "SharedSetPack",
    "StationaryPack",
    "Structure",
    "footprint_order",
    "pack_bank_split",
    "pack_footprint",
    "pack_shared_sets",
    "pack_sliced_ell",
    "pack_stationary",
]

ELL_SLICE = 32  # outputs per slice: one warp on the GPU
ELL_PAD_INDEX = np.iinfo(np.int32).max  # sorts after every real input index
# Outputs per block of the footprint kernel (256 threads, one output each).  On H100 with
# 32-row tiles 256 beat 512 (with 16-row tiles 512 beat 1024 and 256), benchmarks/RESULTS.md.
FOOTPRINT_GROUP = 256
FOOTPRINT_GROUPS = (256, 512)  # the group sizes the kernel is built for
ORDER_KEYS = 8  # leading inputs that key the footprint reordering (then a hash of all)


class Structure:
    """Immutable CSR index structure of ``W^T``: ``n_out`` rows over ``n_in`` columns.

    Attributes:
      indptr: ``[n_out + 1] int32``, ``indptr[0] == 0``, non-decreasing.
      indices: ``[nnz] int32``, input neuron of each nonzero, strictly increasing per row.
      shape: ``(n_in, n_out)``, the shape of ``W``.
    """

    __slots__ = ("indptr", "indices", "shape", "_key", "__dict__")

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int]):
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.indptr.flags.writeable = False
        self.indices.flags.writeable = False
        self.shape = (int(shape[0]), int(shape[1]))
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.indptr.tobytes())
        digest.update(self.indices.tobytes())
        self._key = (self.shape, digest.hexdigest())

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n_in(self) -> int:
        return self.shape[0]

    @property
    def n_out(self) -> int:
        return self.shape[1]

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Structure) and self._key == other._key

    def __repr__(self) -> str:
        return f"Structure(shape={self.shape}, nnz={self.nnz})"

    @cached_property
    def row_ids(self) -> np.ndarray:
        """``[nnz] int32``: the output neuron (CSR row) of each nonzero."""
        return np.repeat(np.arange(self.n_out, dtype=np.int32), np.diff(self.indptr))

    @cached_property
    def transpose(self) -> tuple[Structure, np.ndarray]:
        """The structure of ``W^T`` stored by *its* output neuron, and the permutation.

        Returns ``(structure_t, perm)`` such that a matrix with this structure and
        values ``v`` has the transpose with structure ``structure_t`` and values
        ``v[perm]``.
        """
        order = np.lexsort((self.row_ids, self.indices))  # by input neuron, then output
        counts = np.bincount(self.indices, minlength=self.n_in)
        indptr_t = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        st = Structure(indptr_t, self.row_ids[order], (self.n_out, self.n_in))
        return st, order.astype(np.int32)

    @cached_property
    def sliced_ell(self) -> EllPack:
        """The GPU's packed layout of this structure (see :func:`pack_sliced_ell`)."""
        return pack_sliced_ell(self)

    def footprint(self, group: int | None = None) -> FootprintPack:
        """The footprint kernel's packed layout of this structure (see
        :func:`pack_footprint`; default group: :func:`footprint_group`), cached."""
        group = footprint_group() if group is None else group
        cache = self.__dict__.setdefault("_footprint", {})
        if group not in cache:
            cache[group] = pack_footprint(self, group)
        return cache[group]

    def stationary(self, schedule: bool = True) -> StationaryPack:
        """The stationary-rows kernel's layout (see :func:`pack_stationary`), cached."""
        cache = self.__dict__.setdefault("_stationary", {})
        if schedule not in cache:
            cache[schedule] = pack_stationary(self, schedule=schedule)
        return cache[schedule]

    def shared_sets(self, units: int) -> SharedSetPack:
        """The stationary network kernel's layout (see :func:`pack_shared_sets`), cached."""
        cache = self.__dict__.setdefault("_shared_sets", {})
        if units not in cache:
            cache[units] = pack_shared_sets(self, units)
        return cache[units]

    def bank_split(self, groups: int) -> BankSplitPack:
        """The whole-network GPU kernel's layout (see :func:`pack_bank_split`), cached."""
        cache = self.__dict__.setdefault("_bank_split", {})
        if groups not in cache:
            cache[groups] = pack_bank_split(self, groups)
        return cache[groups]

    def block_diag(self, copies: int) -> Structure:
        """The structure of ``copies`` copies of this matrix on a block diagonal."""
        k = np.arange(copies, dtype=np.int64)
        indptr = (self.indptr[:-1][None, :] + (k * self.nnz)[:, None]).reshape(-1)
        indptr = np.concatenate([indptr, [copies * self.nnz]])
        indices = (self.indices[None, :] + (k * self.n_in)[:, None]).reshape(-1)
        if copies * max(self.nnz, self.n_in, self.n_out) >= 2**31:
            raise ValueError("block-diagonal batch of sparse matrices exceeds int32 indexing")
        return Structure(indptr, indices, (copies * self.n_in, copies * self.n_out))


class _Packed:
    """What the GPU layouts share: a gather of CSR values into packed slots."""

    __slots__ = ()

    @property
    def total(self) -> int:
        """Packed slots, padding included."""
        return int(self.source.shape[0])

    @property
    def padding(self) -> float:
        """``total / nnz`` (1.0 without padding)."""
        return self.total / self.nnz if self.nnz else 1.0

    def pack_values(self, values):
        """``[nnz]`` CSR values -> ``[total]`` packed values (zeros in padding)."""
        values = jnp.asarray(values)
        return pack_values_many([self], [values], values.dtype)


def value_sources(packs) -> np.ndarray:
    """Where each packed slot of several layers takes its value, concatenated: an index
    into the layers' CSR values laid end to end, with one appended zero for padding (the
    host half of :func:`pack_values_many`; :func:`gather_values` is the device half)."""
    if not packs:
        return np.zeros(0, np.int32)
    starts = np.cumsum([0] + [p.nnz for p in packs])
    index_dtype = np.int64 if starts[-1] >= 2**31 - 1 else np.int32
    return np.concatenate(
        [
            np.where(p.source == p.nnz, starts[-1], p.source.astype(np.int64) + s)
            for p, s in zip(packs, starts[:-1])
        ]
    ).astype(index_dtype)


def gather_values(values, source, dtype):
    """The packed values for ``source`` (from :func:`value_sources`, a host or a device
    array): one gather over the layers' ``values`` laid end to end, as ``dtype``."""
    if not values:
        return jnp.zeros((0,), dtype)
    flat = jnp.concatenate([jnp.asarray(v).astype(dtype) for v in values] + [jnp.zeros(1, dtype)])
    return jnp.take(flat, jnp.asarray(source), unique_indices=False)


def pack_values_many(packs, values, dtype):
    """The packed values of several layers, concatenated: one gather (one device kernel)
    instead of one per layer.  ``packs[i].pack_values(values[i])`` for every ``i``, in
    order, as ``dtype``."""
    if not packs:
        return jnp.zeros((0,), dtype)
    return gather_values(values, value_sources(packs), dtype)


class EllPack(_Packed):
    """Warp-sliced ELL packing of a :class:`Structure` (the CUDA kernel's layout).

    Outputs are cut into slices of ``slice`` consecutive neurons.  Slice ``w``
    stores its rows padded to the slice's longest row, slot-major: the ``s``-th
    nonzero of output ``32 * w + l`` sits at ``slice_ptr[w] + s * slice + l``.
    A warp that walks its rows in step therefore reads consecutive addresses.
    Padding slots have index ``ELL_PAD_INDEX`` (larger than any input, so the
    kernel's sorted-row walk stops there) and take a zero value.

    Attributes:
      slice_ptr: ``[n_slices + 1] int32``, start of each slice in the packed arrays.
      indices: ``[total] int32``, input neuron per slot (``ELL_PAD_INDEX`` for padding).
      source: ``[total] int32``, position of each slot's value in the CSR
        ``values`` array, or ``nnz`` for padding (index of an appended zero).
      padding: ``total / nnz`` (1.0 when every slice has equal row lengths).
    """

    __slots__ = ("slice_ptr", "indices", "source", "slice", "nnz")

    def __init__(self, slice_ptr, indices, source, slice_, nnz):
        self.slice_ptr, self.indices, self.source = slice_ptr, indices, source
        self.slice, self.nnz = slice_, nnz


def _slices(structure: Structure, slice_: int = ELL_SLICE):
    """What the warp-sliced layouts share: the longest row of each slice of ``slice_``
    consecutive outputs, and each nonzero's output and position in its row (int64)."""
    n_out, nnz = structure.n_out, structure.nnz
    n_slices = -(-n_out // slice_)
    counts = np.zeros(n_slices * slice_, np.int64)
    counts[:n_out] = np.diff(structure.indptr)
    longest = counts.reshape(n_slices, slice_).max(axis=1) if n_slices else counts[:0]
    rows = structure.row_ids.astype(np.int64)
    pos = np.arange(nnz, dtype=np.int64) - structure.indptr[rows]
    return longest, rows, pos


def pack_sliced_ell(structure: Structure, slice_: int = ELL_SLICE) -> EllPack:
    """Packs a CSR-of-``W^T`` structure into warp-sliced ELL (host, vectorized).

    Done once per structure (cached on :attr:`Structure.sliced_ell`); only the
    values are re-gathered per call, with :meth:`EllPack.pack_values`.
    """
    nnz = structure.nnz
    slice_len, rows, pos = _slices(structure, slice_)
    slice_ptr = np.concatenate([[0], np.cumsum(slice_len * slice_)])
    total = int(slice_ptr[-1])
    if total >= 2**31:
        raise ValueError(f"sliced ELL packing needs {total} slots, more than 2^31 - 1")
    dest = slice_ptr[rows // slice_] + pos * slice_ + rows % slice_
    indices = np.full(total, ELL_PAD_INDEX, np.int32)
    indices[dest] = structure.indices
    source = np.full(total, nnz, np.int32)
    source[dest] = np.arange(nnz, dtype=np.int32)
    slice_ptr = slice_ptr.astype(np.int32)
    for a in (slice_ptr, indices, source):
        a.flags.writeable = False
    return EllPack(slice_ptr, indices, source, slice_, nnz)


def footprint_group() -> int:
    """Outputs per block of the footprint kernel: ``FOOTPRINT_GROUP``, or the environment's
    ``SPDNN_FP_GROUP`` (one of ``FOOTPRINT_GROUPS``; for tuning)."""
    value = os.environ.get("SPDNN_FP_GROUP")
    if value is None:
        return FOOTPRINT_GROUP
    if value not in tuple(str(g) for g in FOOTPRINT_GROUPS):
        raise ValueError(f"SPDNN_FP_GROUP must be one of {FOOTPRINT_GROUPS}, got {value!r}")
    return int(value)


def mix_inputs(indices):
    """A 32-bit mix of each input index (numpy or jax arrays; wraps, no overflow checks):
    summed over an output's inputs it keys the footprint reordering."""
    h = indices.astype(np.uint32) * np.uint32(0x9E3779B1)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    return h ^ (h >> np.uint32(13))


def footprint_order(structure: Structure) -> np.ndarray:
    """Output neurons ordered so that outputs with equal or similar input sets are adjacent.

    Sorted by their first ``ORDER_KEYS`` inputs (a missing input counts as ``n_in``), then by
    a hash of the whole input set, then by index: outputs with identical inputs always end
    up adjacent, outputs sharing leading inputs nearly so.  Any sparsity pattern works; the
    order only decides which outputs share a block (and so its footprint).  Returns
    ``order [n_out] int32`` (new position -> output neuron).
    """
    n_out, indptr = structure.n_out, structure.indptr.astype(np.int64)
    counts = np.diff(indptr)
    width = min(int(counts.max(initial=0)), ORDER_KEYS)
    keys = []
    for i in range(width):
        k = np.full(n_out, structure.n_in, np.int64)
        has = counts > i
        k[has] = structure.indices[indptr[:-1][has] + i]
        keys.append(k)
    mixed = mix_inputs(structure.indices)
    h = np.zeros(n_out, np.uint32)
    nonempty = counts > 0
    if mixed.size:
        h[nonempty] = np.add.reduceat(mixed, indptr[:-1][nonempty], dtype=np.uint32)
    order = np.lexsort((np.arange(n_out), h, *keys[::-1]))
    return order.astype(np.int32)


class FootprintPack(_Packed):
    """Footprint packing of a :class:`Structure` (the CUDA footprint network kernel).

    Output neurons are reordered by :func:`footprint_order` and cut into groups of
    ``group`` (one block of the kernel each).  Group ``g``'s footprint is the ascending list
    of distinct inputs its outputs use, ``fp_cols[fp_ptr[g]:fp_ptr[g + 1]]``: the kernel
    stages only those columns of its feature rows.  The weights are warp-sliced ELL (as
    :class:`EllPack`) in the reordered output order, each index being a *slot* of the
    group's footprint (``ELL_PAD_INDEX`` for padding); slots keep the inputs' order, so every
    output still sums its inputs in increasing order.

    Attributes:
      perm: ``[n_out] int32``, the output neuron at each reordered position.
      slice_ptr, indices, source: the sliced ELL of the reordered outputs (``indices`` are
        footprint slots; ``source`` indexes the *original* CSR values).
      fp_ptr: ``[n_groups + 1] int32``; fp_cols: ``[fp_ptr[-1]] int32``.
      group, nnz; padding: ``total / nnz``; staged: ``fp_ptr[-1]`` (columns staged per row).
    """

    __slots__ = ("perm", "slice_ptr", "indices", "source", "fp_ptr", "fp_cols", "group", "nnz")

    def __init__(self, perm, slice_ptr, indices, source, fp_ptr, fp_cols, group, nnz):
        self.perm, self.slice_ptr, self.indices, self.source = perm, slice_ptr, indices, source
        self.fp_ptr, self.fp_cols, self.group, self.nnz = fp_ptr, fp_cols, group, nnz

    @property
    def staged(self) -> int:
        """Input columns a feature row is staged through shared memory per layer."""
        return int(self.fp_ptr[-1])


def _reorder_outputs(structure: Structure, perm: np.ndarray) -> tuple[Structure, np.ndarray]:
    """The structure with its outputs in the order ``perm`` (new position -> output), and
    the position in the original CSR of each of its nonzeros (int64)."""
    indptr = structure.indptr.astype(np.int64)
    counts = np.diff(indptr)[perm]
    new_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    moved = np.repeat(indptr[:-1][perm] - new_ptr[:-1], counts) + np.arange(
        structure.nnz, dtype=np.int64
    )
    return Structure(new_ptr, structure.indices[moved], structure.shape), moved


def pack_footprint(structure: Structure, group: int = FOOTPRINT_GROUP) -> FootprintPack:
    """Packs a CSR-of-``W^T`` structure for the footprint kernel (host, vectorized).

    See :class:`FootprintPack`.  Done once per structure (cached on
    :meth:`Structure.footprint`); only the values are re-gathered per call.
    """
    if group % ELL_SLICE or group <= 0:
        raise ValueError(f"pack_footprint: group must be a multiple of {ELL_SLICE}, got {group}")
    n_in, n_out, nnz = structure.n_in, structure.n_out, structure.nnz
    perm = footprint_order(structure)
    reordered, moved = _reorder_outputs(structure, perm)
    ell = pack_sliced_ell(reordered)
    padded = ell.source == nnz
    source = np.append(moved, nnz)[ell.source]  # padding keeps nnz (the appended zero)
    n_groups = -(-n_out // group)
    slice_of = np.repeat(np.arange(ell.slice_ptr.shape[0] - 1), np.diff(ell.slice_ptr))
    g_real = (slice_of // (group // ELL_SLICE)).astype(np.int64)[~padded]
    key = g_real * (n_in + 1) + ell.indices[~padded]
    uniq, inverse = np.unique(key, return_inverse=True)
    fp_ptr = np.searchsorted(uniq, np.arange(n_groups + 1, dtype=np.int64) * (n_in + 1))
    indices = np.full(ell.total, ELL_PAD_INDEX, np.int32)
    indices[~padded] = inverse.reshape(-1) - fp_ptr[g_real]
    fp_cols = (uniq % (n_in + 1)).astype(np.int32)
    out = (perm, ell.slice_ptr, indices, source.astype(np.int32), fp_ptr.astype(np.int32), fp_cols)
    for a in out:
        a.flags.writeable = False
    return FootprintPack(*out, group, nnz)


# The tensor-core form of the footprint layers (cuda/footprint_layer.cuh,
# footprint_mma_convert): a group's footprint must fit one staged chunk, its tiles the
# shared memory.
MMA_MAX_COLS = 512
MMA_TILE_CAP = 144
MMA_TILE_OUTPUTS = 16  # a tile is 16 consecutive (reordered) outputs by 8 footprint slots
MMA_TILE_SLOTS = 8


class TensorCoreTiles(NamedTuple):
    """How a layer's weights cut into the dense 16 x 8 tiles of the footprint layers'
    tensor-core form (see :func:`tensor_core_tiles`).

    Attributes:
      footprint: ``[n_groups] int64``, distinct inputs per group of outputs.
      tiles: ``[n_groups] int64``, tiles per group: ``ceil(u / 8)`` summed over the
        group's units of 16 outputs, ``u`` being a unit's number of distinct inputs.
      fits: every group fits (``footprint <= MMA_MAX_COLS`` and ``tiles <= MMA_TILE_CAP``),
        so the layer runs on tensor cores (float32 features, a finite clip, finite values).
      density: nonzeros over the weights the tiles hold (``128`` per tile); 1.0 when each
        unit of 16 outputs shares its inputs.
    """

    footprint: np.ndarray
    tiles: np.ndarray
    fits: bool
    density: float


def tensor_core_tiles(structure: Structure, group: int = FOOTPRINT_GROUP) -> TensorCoreTiles:
    """The tensor-core form's tiles of a layer (host, vectorized; the device makes the same
    cut from the footprint packing before each layer).

    Outputs are taken in :func:`footprint_order` (outputs with equal or similar inputs
    adjacent), cut into groups of ``group`` and units of 16.  Any sparsity pattern can be
    cut; only patterns whose units of 16 outputs share most of their inputs give dense
    tiles, and a layer where a group does not fit runs on the FMA kernel instead.
    """
    if group % ELL_SLICE or group <= 0:
        raise ValueError(f"tensor_core_tiles: group must be a multiple of {ELL_SLICE}, got {group}")
    n_out, n_in = structure.n_out, structure.n_in
    n_groups = -(-n_out // group)
    perm = footprint_order(structure)
    reordered, _ = _reorder_outputs(structure, perm)
    position = np.repeat(np.arange(n_out, dtype=np.int64), np.diff(reordered.indptr))
    inputs = reordered.indices.astype(np.int64)
    units = np.unique(position // MMA_TILE_OUTPUTS * (n_in + 1) + inputs) // (n_in + 1)
    per_unit = np.bincount(units, minlength=-(-n_out // MMA_TILE_OUTPUTS))
    tiles_per_unit = -(-per_unit // MMA_TILE_SLOTS)
    unit_group = np.arange(per_unit.size) * MMA_TILE_OUTPUTS // group
    tiles = np.bincount(unit_group, weights=tiles_per_unit, minlength=n_groups).astype(np.int64)
    groups = np.unique(position // group * (n_in + 1) + inputs) // (n_in + 1)
    footprint = np.bincount(groups, minlength=n_groups).astype(np.int64)
    fits = bool(np.all(footprint <= MMA_MAX_COLS) and np.all(tiles <= MMA_TILE_CAP))
    held = int(tiles.sum()) * MMA_TILE_OUTPUTS * MMA_TILE_SLOTS
    density = structure.nnz / held if held else 1.0
    return TensorCoreTiles(footprint, tiles, fits, float(density))


class BankSplitPack(_Packed):
    """Bank-split packing of a :class:`Structure` (the resident whole-network GPU kernel).

    That kernel keeps ``rows = 32 // groups`` feature rows of a tile in shared memory,
    one row per lane, and splits each warp into ``groups`` lane groups that work on one
    output neuron together: group ``g`` takes the nonzeros whose input neuron ``i`` has
    ``i % groups == g``.  Input ``i`` of row ``r`` is stored at word ``i * rows + (s ^ r)``
    with ``s = (i // groups) % rows``, so the groups read disjoint banks (no conflicts),
    and a warp staging consecutive inputs of one row also touches 32 distinct banks.

    Output ``j`` takes ``steps[j] = col_ptr[j + 1] - col_ptr[j]`` steps (its largest
    class, rounded up to even); step ``s`` of group ``g`` is entry
    ``col_ptr[j] * groups + (s // 2) * 2 * groups + 2 * g + s % 2``, so one 16-byte load
    gives a group two steps.  Padding entries point at one of ``groups`` zero inputs
    appended after the ``n_in`` real ones (never at a real input: a zero weight times an
    infinite feature would make a NaN).

    Attributes:
      col_ptr: ``[n_out + 1] int64``, first step of each output.
      offsets: ``[total] int32``, ``i * rows + s`` per entry (the kernel XORs the row in).
      source: ``[total] int32``, position of each entry's value in the CSR ``values``,
        or ``nnz`` for padding (index of an appended zero).
      groups, rows, n_in, nnz.
      padding: ``total / nnz``.
    """

    __slots__ = ("col_ptr", "offsets", "source", "groups", "n_in", "nnz")

    def __init__(self, col_ptr, offsets, source, groups, n_in, nnz):
        self.col_ptr, self.offsets, self.source = col_ptr, offsets, source
        self.groups, self.n_in, self.nnz = groups, n_in, nnz

    @property
    def rows(self) -> int:
        return 32 // self.groups

    def input_of(self, offsets: np.ndarray) -> np.ndarray:
        """Input neuron of packed ``offsets`` (``>= n_in`` for padding)."""
        return np.asarray(offsets) // self.rows


def bank_offset(i, groups: int):
    """Shared-memory word of input ``i`` (row 0) in the bank-split layout."""
    rows = 32 // groups
    i = np.asarray(i, np.int64)
    return i * rows + (i // groups) % rows


def pack_bank_split(structure: Structure, groups: int) -> BankSplitPack:
    """Packs a CSR-of-``W^T`` structure for the resident whole-network GPU kernel.

    ``groups`` (1, 2, 4, 8, 16 or 32) lane groups per warp; see :class:`BankSplitPack`.
    Host-side and vectorized; done once per structure (cached by :meth:`Structure.bank_split`).
    """
    if groups not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"pack_bank_split: groups must be a power of two <= 32, got {groups}")
    n_in, n_out, nnz = structure.n_in, structure.n_out, structure.nnz
    G = groups
    cols = structure.row_ids.astype(np.int64)
    idx = structure.indices.astype(np.int64)
    key = cols * G + idx % G
    counts = np.bincount(key, minlength=n_out * G) if n_out else np.zeros(0, np.int64)
    order = np.argsort(key, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rank = np.empty(nnz, np.int64)
    rank[order] = np.arange(nnz, dtype=np.int64) - first[key[order]]
    steps = counts.reshape(n_out, G).max(axis=1) if n_out else np.zeros(0, np.int64)
    steps = steps + steps % 2
    col_ptr = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    total = int(col_ptr[-1]) * G
    if total >= 2**31:
        raise ValueError(f"pack_bank_split: {total} entries, more than 2^31 - 1")
    # Padding: entry e belongs to group (e % 2G) // 2; its zero input n_in + ((g - n_in) % G).
    g_of = np.arange(2 * G) // 2
    pad_off = bank_offset(n_in + (g_of - n_in) % G, G).astype(np.int32)
    offsets = np.tile(pad_off, total // (2 * G)) if total else np.zeros(0, np.int32)
    dest = col_ptr[cols] * G + (rank // 2) * 2 * G + (idx % G) * 2 + rank % 2
    offsets[dest] = bank_offset(idx, G)
    source = np.full(total, nnz, np.int32)
    source[dest] = np.arange(nnz, dtype=np.int32)
    for a in (col_ptr, offsets, source):
        a.flags.writeable = False
    return BankSplitPack(col_ptr, offsets, source, G, n_in, nnz)


# Largest input count of the stationary layout: its 16-bit indices keep one value for padding.
STATIONARY_MAX_IN = 0xFFFF - 1
# Work bound of the bank schedule (slices x 32 x longest row^2 element operations), about a
# second of host time once per structure; longer rows keep their CSR order.
STATIONARY_SCHEDULE_WORK = 1 << 26


class StationaryPack(_Packed):
    """Packing of a :class:`Structure` for the stationary-rows ``sparse_linear`` kernel.

    That kernel keeps a tile of whole feature rows in shared memory (input ``i`` of row
    ``r`` at word ``i * R + r``, ``R`` odd) and gives each lane of a warp one output of a
    slice of 32; the warp walks its outputs' nonzeros in steps, one per lane per step.
    Lanes gather from random shared-memory words, so two lanes whose inputs fall in the
    same bank (``i % 32``; ``R`` is odd, so the row does not change it) serialize.  With
    ``schedule`` each lane's nonzeros are reordered on the host so that every step's 32
    inputs spread over as many banks as a greedy pass finds (random layers: 1.9 accesses
    per step instead of 3.5).  The order of each output's sum is that schedule's: fixed, so
    results are deterministic, but not the CSR order of the other kernels.

    Slice ``w`` takes ``4 * (group_ptr[w + 1] - group_ptr[w])`` steps (its longest row,
    rounded up to four); step ``s`` of lane ``l`` is slot
    ``(group_ptr[w] + s // 4) * 128 + l * 4 + s % 4``, so one 16-byte load gives a lane
    four values and one 8-byte load four indices.  Padding slots point at input ``n_in``
    (a zero column the kernel appends) with a zero value.

    Attributes:
      group_ptr: ``[n_slices + 1] int32``, first group of four steps of each slice.
      indices: ``[total] uint16``, input neuron per slot (``n_in`` for padding).
      source: ``[total] int32``, position of each slot's value in the CSR ``values``, or
        ``nnz`` for padding.
      scheduled: whether the bank schedule was applied.
      conflicts: mean shared-memory accesses per warp step of row 0 (1.0 is conflict-free).
    """

    __slots__ = ("group_ptr", "indices", "source", "nnz", "scheduled", "conflicts")

    def __init__(self, group_ptr, indices, source, nnz, scheduled, conflicts):
        self.group_ptr, self.indices, self.source = group_ptr, indices, source
        self.nnz, self.scheduled, self.conflicts = nnz, scheduled, conflicts


def _bank_schedule(entry: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Step of every entry of a ``[slices, 32 lanes, L]`` table (``entry`` -1 where a lane
    has fewer than ``L`` nonzeros; ``bank`` each entry's bank): greedy, vectorized over
    slices.  At each step every lane with nonzeros left takes the one whose bank is least
    used so far in this step, ties to the bank with most nonzeros left in the slice; lanes
    go in a rotating order.  Returns ``steps[slices, 32, L]`` (-1 where no entry)."""
    n_slices, lanes, length = entry.shape
    ar = np.arange(n_slices)
    rem = entry >= 0
    demand = np.zeros((n_slices, 32), np.int64)
    np.add.at(demand, (np.broadcast_to(ar[:, None, None], bank.shape)[rem], bank[rem]), 1)
    steps = np.full(entry.shape, -1, np.int64)
    big = 4 * (length + 1) * lanes
    for s in range(length):
        used = np.zeros((n_slices, 32), np.int64)
        for k in range(lanes):
            lane = (7 * k + s) % lanes
            b = bank[:, lane, :]
            cost = used[ar[:, None], b] * big - demand[ar[:, None], b]
            cost = np.where(rem[:, lane, :], cost, np.iinfo(np.int64).max)
            j = cost.argmin(axis=1)
            take = rem[ar, lane, j]
            w, j = ar[take], j[take]
            bb = b[w, j]
            rem[w, lane, j] = False
            steps[w, lane, j] = s
            used[w, bb] += 1
            demand[w, bb] -= 1
    return steps


def pack_stationary(structure: Structure, *, schedule: bool = True) -> StationaryPack:
    """Packs a CSR-of-``W^T`` structure for the stationary-rows kernel (see
    :class:`StationaryPack`).  Host-side, vectorized over slices; done once per structure
    (cached by :meth:`Structure.stationary`)."""
    n_in, nnz = structure.n_in, structure.nnz
    if n_in > STATIONARY_MAX_IN:
        raise ValueError(
            f"pack_stationary: n_in {n_in} exceeds {STATIONARY_MAX_IN} (16-bit input indices)"
        )
    longest, rows, step = _slices(structure)  # step: CSR order
    n_slices = longest.shape[0]
    groups = -(-longest // 4)
    group_ptr = np.concatenate([[0], np.cumsum(groups)])
    total = int(group_ptr[-1]) * 4 * ELL_SLICE
    if total >= 2**31:
        raise ValueError(f"pack_stationary: {total} slots, more than 2^31 - 1")
    length = int(longest.max()) if n_slices else 0
    scheduled = bool(
        schedule and nnz and n_slices * ELL_SLICE * length * length <= STATIONARY_SCHEDULE_WORK
    )
    if scheduled:
        entry = np.full((n_slices * ELL_SLICE, length), -1, np.int64)
        entry[rows, step] = np.arange(nnz)
        entry = entry.reshape(n_slices, ELL_SLICE, length)
        bank = np.where(entry >= 0, structure.indices[np.maximum(entry, 0)] % 32, 0)
        steps = _bank_schedule(entry, bank)
        step = np.empty(nnz, np.int64)
        step[entry[entry >= 0]] = steps[entry >= 0]
    slice_, lane = rows // ELL_SLICE, rows % ELL_SLICE
    dest = (group_ptr[slice_] + step // 4) * (4 * ELL_SLICE) + lane * 4 + step % 4
    indices = np.full(total, n_in, np.uint16)
    indices[dest] = structure.indices
    source = np.full(total, nnz, np.int32)
    source[dest] = np.arange(nnz, dtype=np.int32)
    conflicts = _step_conflicts(indices, source, nnz, total)
    group_ptr = group_ptr.astype(np.int32)
    for a in (group_ptr, indices, source):
        a.flags.writeable = False
    return StationaryPack(group_ptr, indices, source, nnz, scheduled, conflicts)


SHARED_SET_UNITS = (1, 2, 4)  # outputs per unit the stationary network kernel is built for


class SharedSetPack(_Packed):
    """Packing of a :class:`Structure` for the stationary network kernel of ``SparseDNN``
    (``cuda/stationary_layers.cuh``): outputs in *units* of ``units`` outputs with equal
    input sets, which walk one list of inputs together.

    The outputs are taken in :func:`footprint_order` (equal input sets adjacent); each run
    of outputs with one input set is cut into units of ``units`` (the last one of a run may
    be partial).  The kernel gives each unit ``units`` threads, each holding a part of the
    tile's rows and the sums of all the unit's outputs for those rows, so every feature
    value read from shared memory feeds ``units`` multiply-adds.  A warp takes ``32 /
    units`` units (a *slice*) and walks them in steps of one input per unit; slice ``w``
    takes ``4 * (group_ptr[w + 1] - group_ptr[w])`` steps (its longest input set, rounded
    up to four).  Step ``s`` of output ``k`` of the ``j``-th unit of a slice has its value
    at slot ``(group_ptr[w] + s // 4) * 128 + j * 4 * units + (s % 4) * units + k`` and its
    input at ``(group_ptr[w] + s // 4) * (128 / units) + j * 4 + s % 4``: a thread's four
    steps are ``units`` 16-byte loads of values and one 8-byte load of 16-bit inputs.
    Steps follow the CSR order (increasing inputs), so every output sums as the other
    network kernels do.  Padding has input ``n_in`` (a zero column) and a zero value.

    Attributes:
      units: outputs per unit.
      perm: ``[slots] int32``, the output neuron of each unit slot (unit ``u``, output
        ``k`` at ``u * units + k``), -1 for the empty slots of partial units and past the
        last unit; ``slots`` is 1024 (the kernel's threads) times a power of two.
      group_ptr: ``[slots / 32 + 1] int32``; indices: ``[total / units] uint16``;
      source: ``[total] int32``, position of each value slot's value in the CSR
        ``values``, or ``nnz`` for padding.
      fill: outputs over unit slots in use (1.0 when every unit is full).
    """

    __slots__ = ("units", "perm", "group_ptr", "indices", "source", "nnz", "fill")

    def __init__(self, units, perm, group_ptr, indices, source, nnz, fill):
        self.units, self.perm, self.group_ptr, self.indices = units, perm, group_ptr, indices
        self.source, self.nnz, self.fill = source, nnz, fill


def shared_set_runs(structure: Structure, order: np.ndarray) -> np.ndarray:
    """For outputs in ``order``: the run of equal input sets each belongs to (0, 1, ...)."""
    n_out = structure.n_out
    if n_out == 0:
        return np.zeros(0, np.int64)
    indptr = structure.indptr.astype(np.int64)
    counts = np.diff(indptr)[order]
    width = int(counts.max(initial=0))
    table = np.full((n_out, width), -1, np.int64)
    starts = indptr[:-1][order]
    rows = np.repeat(np.arange(n_out), counts)
    cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    table[rows, cols] = structure.indices[np.repeat(starts, counts) + cols]
    new = np.ones(n_out, bool)
    new[1:] = np.any(table[1:] != table[:-1], axis=1) if width else False
    return np.cumsum(new) - 1


def pack_shared_sets(structure: Structure, units: int) -> SharedSetPack:
    """Packs a CSR-of-``W^T`` structure for the stationary network kernel (see
    :class:`SharedSetPack`).  Host-side and vectorized; done once per structure and unit
    size (cached by :meth:`Structure.shared_sets`)."""
    if units not in SHARED_SET_UNITS:
        raise ValueError(f"pack_shared_sets: units must be one of {SHARED_SET_UNITS}, got {units}")
    n_in, n_out, nnz = structure.n_in, structure.n_out, structure.nnz
    if n_in > STATIONARY_MAX_IN:
        raise ValueError(
            f"pack_shared_sets: n_in {n_in} exceeds {STATIONARY_MAX_IN} (16-bit input indices)"
        )
    order = footprint_order(structure)
    reordered, moved = _reorder_outputs(structure, order)
    run = shared_set_runs(structure, order)
    n_runs = int(run[-1]) + 1 if n_out else 0
    run_len = np.bincount(run, minlength=n_runs)
    run_start = np.cumsum(run_len) - run_len
    unit_base = np.cumsum(-(-run_len // units)) - -(-run_len // units)
    pos = np.arange(n_out) - run_start[run]
    unit = unit_base[run] + pos // units  # unit and output-in-unit of each reordered output
    k = pos % units
    n_units = int(unit[-1]) + 1 if n_out else 0
    slots = 1024
    while slots < max(n_units * units, n_out):  # whole blocks of 1024 threads, 2^k of them
        slots *= 2
    perm = np.full(slots, -1, np.int32)
    perm[unit * units + k] = order
    per_warp = 32 // units
    n_warps = slots // 32
    counts = np.diff(reordered.indptr.astype(np.int64))
    longest = np.zeros(n_warps, np.int64)
    if n_out:
        np.maximum.at(longest, unit // per_warp, counts)
    groups = -(-longest // 4)
    group_ptr = np.concatenate([[0], np.cumsum(groups)])
    total = int(group_ptr[-1]) * 128
    if total >= 2**31:
        raise ValueError(f"pack_shared_sets: {total} slots, more than 2^31 - 1")
    rows = reordered.row_ids.astype(np.int64)  # reordered output of each nonzero
    step = np.arange(nnz, dtype=np.int64) - reordered.indptr[rows]
    u, kk = unit[rows], k[rows]
    w, j = u // per_warp, u % per_warp
    g = group_ptr[w] + step // 4
    source = np.full(total, nnz, np.int32)
    source[g * 128 + j * 4 * units + (step % 4) * units + kk] = moved
    indices = np.full(total // units, n_in, np.uint16)
    first = kk == 0
    indices[(g * (128 // units) + j * 4 + step % 4)[first]] = reordered.indices[first]
    fill = n_out / (n_units * units) if n_units else 1.0
    group_ptr = group_ptr.astype(np.int32)
    for a in (perm, group_ptr, indices, source):
        a.flags.writeable = False
    return SharedSetPack(units, perm, group_ptr, indices, source, nnz, fill)


def _step_conflicts(indices, source, nnz, total) -> float:
    """Mean over warp steps of the largest number of distinct inputs in one bank (padding
    excluded): shared-memory accesses per step of the stationary kernel."""
    if total == 0 or nnz == 0:
        return 1.0
    steps = total // 32
    idx = indices.reshape(-1, ELL_SLICE, 4).transpose(0, 2, 1).reshape(steps, ELL_SLICE)
    real = source.reshape(-1, ELL_SLICE, 4).transpose(0, 2, 1).reshape(steps, ELL_SLICE) < nnz
    live = real.any(axis=1)
    idx, real = idx[live].astype(np.int64), real[live]
    # Lanes reading the same word are served together: count distinct words per bank.
    key = np.where(real, idx, -1)
    key = np.sort(key, axis=1)
    first = np.ones_like(key, bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    first &= key >= 0
    per_bank = np.zeros((key.shape[0], 32), np.int64)
    r = np.broadcast_to(np.arange(key.shape[0])[:, None], key.shape)
    np.add.at(per_bank, (r[first], key[first] % 32), 1)
    return float(per_bank.max(axis=1).mean())


def _check_structure(indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int]) -> None:
    n_in, n_out = shape
    if n_in < 0 or n_out < 0:
        raise ValueError(f"SparseMatrix: shape must be non-negative, got {shape}")
    if max(n_in, n_out) >= 2**31:
        raise ValueError(f"SparseMatrix: dimensions must be below 2^31, got {shape}")
    if indptr.ndim != 1 or indptr.shape[0] != n_out + 1:
        raise ValueError(
            f"SparseMatrix: indptr must have length n_out + 1 = {n_out + 1}, "
            f"got shape {indptr.shape}"
        )
    if indices.ndim != 1:
        raise ValueError(f"SparseMatrix: indices must be 1-D, got shape {indices.shape}")
    if indptr[0] != 0:
        raise ValueError(f"SparseMatrix: indptr[0] must be 0, got {indptr[0]}")
    steps = np.diff(indptr.astype(np.int64))
    if np.any(steps < 0):
        bad = int(np.argmax(steps < 0))
        raise ValueError(
            f"SparseMatrix: indptr is not monotone (indptr[{bad}]={indptr[bad]} > "
            f"indptr[{bad + 1}]={indptr[bad + 1]})"
        )
    if indptr[-1] != indices.shape[0]:
        raise ValueError(
            f"SparseMatrix: indptr[-1]={indptr[-1]} does not match the number of "
            f"indices {indices.shape[0]}"
        )
    if indices.shape[0] >= 2**31:
        raise ValueError("SparseMatrix: more than 2^31 - 1 nonzeros per matrix")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_in:
            bad = lo if lo < 0 else hi
            raise ValueError(f"SparseMatrix: input index {bad} out of range for n_in={n_in}")
        # Strictly increasing within each row: equal neighbours are duplicates.
        d = np.diff(indices.astype(np.int64))
        row_start = np.zeros(indices.shape[0], dtype=bool)
        starts = indptr[:-1][steps > 0]
        row_start[starts] = True
        inner = ~row_start[1:]
        if np.any((d == 0) & inner):
            k = int(np.argmax((d == 0) & inner)) + 1
            row = int(np.searchsorted(indptr, k, side="right") - 1)
            raise ValueError(
                f"SparseMatrix: duplicate entry W[{indices[k]}, {row}] "
                "(sum duplicates before building the matrix)"
            )
        if np.any((d < 0) & inner):
            raise ValueError("SparseMatrix: indices must be sorted within each output row")


def _check_values(values: Any, nnz: int) -> None:
    if tuple(np.shape(values)) != (nnz,):
        raise ValueError(
            f"SparseMatrix: values must have shape ({nnz},), got {tuple(np.shape(values))}"
        )
    dtype = np.dtype(getattr(values, "dtype", np.float32))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"SparseMatrix: values must be floating point, got {dtype}")
    if isinstance(values, jax.core.Tracer):
        return
    v = np.asarray(values)
    if not np.all(np.isfinite(v)):
        bad = int(np.argmax(~np.isfinite(v)))
        raise ValueError(f"SparseMatrix: values must be finite, got {v[bad]} at position {bad}")


def _from_sorted_triplets(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int], dtype
) -> SparseMatrix:
    """rows = input neuron i, cols = output neuron j of W[i, j]."""
    n_in, n_out = int(shape[0]), int(shape[1])
    rows = np.asarray(rows).reshape(-1)
    cols = np.asarray(cols).reshape(-1)
    vals = np.asarray(vals).reshape(-1)
    if not (rows.shape == cols.shape == vals.shape):
        raise ValueError(
            f"SparseMatrix: rows, cols and vals must have equal lengths, got "
            f"{rows.shape[0]}, {cols.shape[0]}, {vals.shape[0]}"
        )
    for name, a, n in (("row (input)", rows, n_in), ("column (output)", cols, n_out)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"SparseMatrix: {name} indices must be integers, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= n):
            bad = a.min() if a.min() < 0 else a.max()
            raise ValueError(f"SparseMatrix: {name} index {bad} out of range for size {n}")
    order = np.lexsort((rows, cols))
    cols_s = cols[order].astype(np.int64)
    counts = np.bincount(cols_s, minlength=n_out) if n_out else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dt = (
        np.dtype(dtype)
        if dtype is not None
        else (vals.dtype if np.issubdtype(vals.dtype, np.floating) else np.dtype(np.float32))
    )
    return SparseMatrix(indptr, rows[order], vals[order].astype(dt), (n_in, n_out))


@jax.tree_util.register_pytree_node_class
class SparseMatrix:
    """A sparse weight matrix ``W: [n_in, n_out]`` stored by output neuron.

    Build one with :meth:`from_scipy`, :meth:`from_dense`, :meth:`from_triplets`,
    :meth:`from_bcsr` or :meth:`from_bcoo`, or directly from CSR arrays of ``W^T``::

        SparseMatrix(indptr, indices, values, shape=(n_in, n_out))

    where ``indptr: [n_out + 1]``, ``indices: [nnz]`` (input neuron of each
    nonzero, sorted within each output row) and ``values: [nnz]`` floating.
    Output neurons with no nonzeros are legal.  Bad structure or non-finite
    values raise ``ValueError`` naming the problem.
    """

    def __init__(self, indptr, indices, values, shape, *, _structure: Structure | None = None):
        if _structure is None:
            indptr = np.asarray(indptr)
            indices = np.asarray(indices)
            if indptr.size and not np.issubdtype(indptr.dtype, np.integer):
                raise ValueError(f"SparseMatrix: indptr must be integer, got {indptr.dtype}")
            if indices.size and not np.issubdtype(indices.dtype, np.integer):
                raise ValueError(f"SparseMatrix: indices must be integer, got {indices.dtype}")
            if len(tuple(shape)) != 2:
                raise ValueError(f"SparseMatrix: shape must be (n_in, n_out), got {shape}")
            shape = (int(shape[0]), int(shape[1]))
            _check_structure(indptr, indices, shape)
            _structure = Structure(indptr, indices, shape)
            if not isinstance(values, jax.Array | jax.core.Tracer):
                values = np.asarray(values)
                if not np.issubdtype(values.dtype, np.floating):
                    values = values.astype(np.float32)
            _check_values(values, _structure.nnz)
        self.structure = _structure
        self.values = values

    # -- pytree -----------------------------------------------------------------
    def tree_flatten(self):
        return (self.values,), self.structure

    @classmethod
    def tree_unflatten(cls, structure, children):
        obj = object.__new__(cls)
        obj.structure = structure
        obj.values = children[0]
        return obj

    # -- properties -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.structure.shape

    @property
    def n_in(self) -> int:
        return self.structure.n_in

    @property
    def n_out(self) -> int:
        return self.structure.n_out

    @property
    def nnz(self) -> int:
        return self.structure.nnz

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.values.dtype)

    @property
    def indptr(self) -> np.ndarray:
        return self.structure.indptr

    @property
    def indices(self) -> np.ndarray:
        return self.structure.indices

    def __repr__(self) -> str:
        return f"SparseMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"

    # -- constructors -----------------------------------------------------------
    @classmethod
    def from_triplets(cls, rows, cols, vals, shape, *, dtype=None) -> SparseMatrix:
        """From coordinates: ``W[rows[k], cols[k]] = vals[k]`` (rows: input, cols: output).

        Duplicate coordinates raise ``ValueError``.
        """
        return _from_sorted_triplets(rows, cols, vals, tuple(shape), dtype)

    @classmethod
    def from_scipy(cls, matrix, *, dtype=None) -> SparseMatrix:
        """From any ``scipy.sparse`` matrix or array of shape ``[n_in, n_out]``.

        Explicitly stored zeros are kept as structural nonzeros.  Duplicate
        entries (a non-canonical COO/CSR) raise ``ValueError``.
        """
        if not sps.issparse(matrix):
            raise TypeError(
                f"SparseMatrix.from_scipy expects a scipy.sparse matrix, got {type(matrix)}"
            )
        coo = matrix.tocoo()
        return _from_sorted_triplets(coo.row, coo.col, coo.data, coo.shape, dtype)

    @classmethod
    def from_dense(cls, w, *, threshold: float = 0.0, dtype=None) -> SparseMatrix:
        """From a dense ``[n_in, n_out]`` array, keeping entries with ``|w| > threshold``."""
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"SparseMatrix.from_dense expects a 2-D array, got shape {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("SparseMatrix: values must be finite (dense input has NaN/Inf)")
        rows, cols = np.nonzero(np.abs(w) > threshold)
        dt = (
            dtype
            if dtype is not None
            else (w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32)
        )
        return _from_sorted_triplets(rows, cols, w[rows, cols], w.shape, dt)

    @classmethod
    def from_bcoo(cls, m) -> SparseMatrix:
        """From a 2-D ``jax.experimental.sparse.BCOO`` of shape ``[n_in, n_out]``."""
        from jax.experimental import sparse as jsparse

        if not isinstance(m, jsparse.BCOO) or m.ndim != 2 or m.n_batch or m.n_dense:
            raise TypeError("SparseMatrix.from_bcoo expects a 2-D BCOO without batch/dense dims")
        idx = np.asarray(m.indices)
        data = np.asarray(m.data)
        keep = (idx[:, 0] < m.shape[0]) & (idx[:, 1] < m.shape[1])  # drop BCOO padding
        return _from_sorted_triplets(idx[keep, 0], idx[keep, 1], data[keep], m.shape, data.dtype)

    @classmethod
    def from_bcsr(cls, m) -> SparseMatrix:
        """From a 2-D ``jax.experimental.sparse.BCSR`` of shape ``[n_in, n_out]``."""
        from jax.experimental import sparse as jsparse

        if not isinstance(m, jsparse.BCSR) or m.ndim != 2 or m.n_batch or m.n_dense:
            raise TypeError("SparseMatrix.from_bcsr expects a 2-D BCSR without batch/dense dims")
        indptr = np.asarray(m.indptr)
        cols = np.asarray(m.indices)[: indptr[-1]]
        rows = np.repeat(np.arange(m.shape[0]), np.diff(indptr))
        data = np.asarray(m.data)[: indptr[-1]]
        return _from_sorted_triplets(rows, cols, data, m.shape, data.dtype)

    # -- conversions --------------------------------------------------------------
    def todense(self) -> jax.Array:
        """The dense ``[n_in, n_out]`` matrix (differentiable in ``values``)."""
        s = self.structure
        out = jnp.zeros(s.shape, dtype=self.values.dtype)
        return out.at[s.indices, s.row_ids].set(self.values, unique_indices=True)

    def to_scipy(self) -> sps.csc_matrix:
        """A ``scipy.sparse.csc_matrix`` of shape ``[n_in, n_out]`` (same storage order)."""
        s = self.structure
        return sps.csc_matrix((np.asarray(self.values), s.indices, s.indptr), shape=s.shape)

    def astype(self, dtype) -> SparseMatrix:
        return SparseMatrix.tree_unflatten(self.structure, (self.values.astype(dtype),))

    def with_values(self, values) -> SparseMatrix:
        """The same structure with new nonzero values (``[nnz]``)."""
        _check_values(values, self.nnz)
        return SparseMatrix.tree_unflatten(self.structure, (values,))

    @property
    def T(self) -> SparseMatrix:
        """The transpose ``W^T: [n_out, n_in]`` as a SparseMatrix."""
        st, perm = self.structure.transpose
        return SparseMatrix.tree_unflatten(st, (self.values[perm],))
