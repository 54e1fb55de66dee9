"""``sparse_conv2d``: direct sparse convolution of pruned CNN filters (Escort-style).

:class:`SparseConvKernel` holds pruned filters ``[O, C/groups, KH, KW]`` (OIHW) stored by
output channel: the CSR of the ``[O, C/groups * KH * KW]`` filter matrix, index structure
static, nonzero values as the pytree leaf.  :func:`sparse_conv2d` computes
``act(conv(x, K) + bias)`` with the semantics of ``lax.conv_general_dilated`` (same padding
rules, strides, dilation, feature groups, output shapes) directly from the sparse filter: no
im2col, each nonzero's tap is "stretched" once per input geometry into an offset into the
input image, and taps that land in the padding are skipped.

It is a JAX primitive with CPU and CUDA lowerings to XLA FFI kernels, a batching rule and
JVP/transpose rules in ``x`` and the filter's nonzero values (so fine-tuning a pruned CNN
works with ``jax.grad``).  The kernels compute in NCHW; NHWC inputs are transposed around
them by the lowering.  The backward convolutions run through XLA's dense convolution at
``Precision.HIGHEST`` on the densified filter (a pruned filter is small), with the values'
cotangent gathered at the nonzeros.

Pruning tools: :meth:`SparseConvKernel.from_oihw` / :meth:`~SparseConvKernel.from_hwio` with a
magnitude ``threshold`` or a target ``sparsity`` per layer, and :func:`prune_global` for one
magnitude threshold across several layers.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_spdnn import _native
from jax_spdnn.linear import (
    _FEATURE_DTYPES,
    ACTIVATIONS,
    _acc_dtype,
    _aval_vma,
    _check_features,
    _expect_operand,
    _match_vma,
    _vma,
)
from jax_spdnn.sparse import SparseMatrix, Structure

__all__ = [
    "SparseConvKernel",
    "conv_output_shape",
    "magnitude_threshold",
    "prune_global",
    "sparse_conv2d",
    "sparse_conv2d_p",
]

_TARGET = "spdnn_sparse_conv_direct"  # same name on CPU and CUDA, different arguments
_TILED_TARGET = "spdnn_sparse_conv_tiled"  # CUDA only: stride 1, dilation 1, KW in {1, 3, 5}

sparse_conv2d_p = Primitive("sparse_conv2d")


# -- the filter container ----------------------------------------------------------------------


def magnitude_threshold(w, sparsity: float) -> float:
    """The magnitude below or at which a fraction ``sparsity`` of ``w``'s entries fall.

    Keeping ``|w| > threshold`` then prunes at least ``sparsity`` of the entries (exactly, up
    to ties in magnitude).
    """
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    a = np.sort(np.abs(np.asarray(w, dtype=np.float64)).ravel())
    k = int(round(float(sparsity) * a.size))
    if k == 0:
        return -1.0  # keep everything, zeros included
    return float(a[k - 1])


@jax.tree_util.register_pytree_node_class
class SparseConvKernel:
    """Pruned convolution filters ``[O, C/groups, KH, KW]`` stored by output channel.

    Build one with :meth:`from_oihw` or :meth:`from_hwio` (dense filters, pruned by a
    magnitude ``threshold`` or a target ``sparsity``), or from CSR arrays::

        SparseConvKernel(indptr, indices, values, shape=(O, C_per_group, KH, KW))

    where row ``o`` of the CSR lists flat taps ``(c * KH + kh) * KW + kw`` (sorted).  Output
    channels with no nonzeros are legal.  Bad structure or non-finite values raise
    ``ValueError`` naming the problem.  ``values`` is the only pytree leaf.
    """

    def __init__(self, indptr, indices, values, shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) < 0 or min(shape[1:]) < 1:
            raise ValueError(
                f"SparseConvKernel: shape must be (O, C_per_group, KH, KW) with C, KH, KW >= 1, "
                f"got {shape}"
            )
        o, c, kh, kw = shape
        m = SparseMatrix(indptr, indices, values, (c * kh * kw, o))
        self.matrix = m
        self.shape = shape

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.matrix.values,), (self.matrix.structure, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        structure, shape = aux
        obj = object.__new__(cls)
        obj.matrix = SparseMatrix.tree_unflatten(structure, children)
        obj.shape = shape
        return obj

    # -- properties -----------------------------------------------------------------------
    @property
    def structure(self) -> Structure:
        return self.matrix.structure

    @property
    def values(self):
        return self.matrix.values

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels_per_group(self) -> int:
        return self.shape[1]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def nnz(self) -> int:
        return self.matrix.nnz

    @property
    def dtype(self) -> np.dtype:
        return self.matrix.dtype

    @property
    def sparsity(self) -> float:
        """Fraction of filter entries that are not stored."""
        size = math.prod(self.shape)
        return 1.0 - self.nnz / size if size else 0.0

    def __repr__(self) -> str:
        return (
            f"SparseConvKernel(shape={self.shape}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.3f}, dtype={self.dtype})"
        )

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_oihw(
        cls, w, *, threshold: float | None = None, sparsity: float | None = None, dtype=None
    ) -> SparseConvKernel:
        """From dense OIHW filters, keeping ``|w| > threshold`` (default: the nonzeros), or
        the largest-magnitude ``1 - sparsity`` fraction (magnitude pruning of this layer)."""
        w = np.asarray(w)
        if w.ndim != 4:
            raise ValueError(f"SparseConvKernel.from_oihw expects a 4-D OIHW array, got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("SparseConvKernel: values must be finite (dense input has NaN/Inf)")
        if threshold is not None and sparsity is not None:
            raise ValueError("SparseConvKernel: give either threshold or sparsity, not both")
        if sparsity is not None:
            keep = _top_magnitude_mask(w, float(sparsity))
        else:
            keep = np.abs(w) > (0.0 if threshold is None else float(threshold))
        o, c, kh, kw = w.shape
        rows, taps = np.nonzero(keep.reshape(o, -1))
        m = SparseMatrix.from_triplets(
            taps, rows, w.reshape(o, -1)[rows, taps], (c * kh * kw, o), dtype=dtype
        )
        return cls.tree_unflatten((m.structure, w.shape), (m.values,))

    @classmethod
    def from_hwio(cls, w, **kwargs) -> SparseConvKernel:
        """From dense HWIO filters (Flax's ``nn.Conv`` layout); see :meth:`from_oihw`."""
        w = np.asarray(w)
        if w.ndim != 4:
            raise ValueError(f"SparseConvKernel.from_hwio expects a 4-D HWIO array, got {w.shape}")
        return cls.from_oihw(np.transpose(w, (3, 2, 0, 1)), **kwargs)

    # -- conversions ------------------------------------------------------------------------
    def todense(self, layout: str = "OIHW") -> jax.Array:
        """The dense filters, ``"OIHW"`` or ``"HWIO"`` (differentiable in ``values``)."""
        dense = self.matrix.todense().T.reshape(self.shape)
        if layout == "OIHW":
            return dense
        if layout == "HWIO":
            return jnp.transpose(dense, (2, 3, 1, 0))
        raise ValueError(f"layout must be 'OIHW' or 'HWIO', got {layout!r}")

    def with_values(self, values) -> SparseConvKernel:
        """The same structure with new nonzero values (``[nnz]``)."""
        return SparseConvKernel.tree_unflatten(
            (self.structure, self.shape), (self.matrix.with_values(values).values,)
        )

    def astype(self, dtype) -> SparseConvKernel:
        return SparseConvKernel.tree_unflatten(
            (self.structure, self.shape), (self.values.astype(dtype),)
        )


def _top_magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Mask keeping the ``round((1 - sparsity) * size)`` largest magnitudes (ties by index)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = np.abs(w).ravel()
    n_keep = flat.size - int(round(sparsity * flat.size))
    mask = np.zeros(flat.size, bool)
    if n_keep > 0:
        order = np.argsort(-flat, kind="stable")
        mask[order[:n_keep]] = True
    return mask.reshape(w.shape)


def prune_global(filters, sparsity: float, *, layout: str = "OIHW"):
    """Magnitude-prunes several layers with one global threshold.

    ``filters`` is a sequence or dict of dense filters (``layout`` "OIHW" or "HWIO"); returns
    the same container of :class:`SparseConvKernel` with about ``sparsity`` of all entries,
    taken together, pruned (layers with small weights lose more).
    """
    if layout not in ("OIHW", "HWIO"):
        raise ValueError(f"layout must be 'OIHW' or 'HWIO', got {layout!r}")
    items = list(filters.items()) if isinstance(filters, dict) else list(enumerate(filters))
    if not items:
        raise ValueError("prune_global: no filters given")
    arrays = [np.asarray(w) for _, w in items]
    threshold = magnitude_threshold(np.concatenate([a.ravel() for a in arrays]), sparsity)
    make = SparseConvKernel.from_oihw if layout == "OIHW" else SparseConvKernel.from_hwio
    out = [make(a, threshold=threshold) for a in arrays]
    if isinstance(filters, dict):
        return {k: v for (k, _), v in zip(items, out)}
    return type(filters)(out) if isinstance(filters, tuple) else out


# -- geometry ----------------------------------------------------------------------------------


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        v = (int(v), int(v))
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise TypeError(
            f"sparse_conv2d: {name} must be an int or a pair of ints, got {v!r}"
        ) from None
    if a < 1 or b < 1:
        raise ValueError(f"sparse_conv2d: {name} must be positive, got {(a, b)}")
    return a, b


def _pads(padding, in_hw, window_hw, strides) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"sparse_conv2d: padding must be 'SAME', 'SAME_LOWER', 'VALID' or pairs, "
                f"got {padding!r}"
            )
        pads = lax.padtype_to_pads(in_hw, window_hw, strides, padding.upper())
        return tuple((int(a), int(b)) for a, b in pads)
    try:
        pads = tuple((int(a), int(b)) for a, b in padding)
    except (TypeError, ValueError):
        raise TypeError(
            f"sparse_conv2d: padding must be a string or ((top, bottom), (left, right)), "
            f"got {padding!r}"
        ) from None
    if len(pads) != 2:
        raise ValueError(f"sparse_conv2d: padding needs 2 (low, high) pairs, got {len(pads)}")
    return pads


def conv_output_shape(in_hw, kernel_hw, strides, pads, dilation) -> tuple[int, int]:
    """Output height and width, as ``lax.conv_general_dilated`` computes them."""
    out = []
    for n, k, s, (lo, hi), d in zip(in_hw, kernel_hw, strides, pads, dilation):
        span = n + lo + hi - ((k - 1) * d + 1)
        out.append(max(0, span // s + 1) if span >= 0 else 0)
    return tuple(out)


@lru_cache(maxsize=256)
def _taps(structure: Structure, shape, dilation, groups, hw) -> tuple[np.ndarray, ...]:
    """Per nonzero: input channel (group base included), dilated row and column offsets, and
    the CUDA record ``{chan*H*W + dy*W + dx, dy, dx, 0}``.  Cached per kernel and geometry."""
    o, cg, kh, kw = shape
    tap = structure.indices.astype(np.int64)
    c_local, rest = np.divmod(tap, kh * kw)
    r, s = np.divmod(rest, kw)
    group = structure.row_ids.astype(np.int64) // max(o // groups, 1)
    chan = group * cg + c_local
    dy, dx = r * dilation[0], s * dilation[1]
    h, w = hw
    records = np.zeros((structure.nnz, 4), np.int32)
    records[:, 0] = chan * h * w + dy * w + dx
    records[:, 1] = dy
    records[:, 2] = dx
    return chan.astype(np.int32), dy.astype(np.int32), dx.astype(np.int32), records


# -- public op ---------------------------------------------------------------------------------


def sparse_conv2d(
    x,
    K: SparseConvKernel,
    *,
    strides=1,
    padding="SAME",
    dilation=1,
    groups: int = 1,
    bias=None,
    activation: str | None = None,
    layout: str = "NCHW",
):
    """Direct sparse 2-D convolution ``act(conv(x, K) + bias)``.

    Same semantics as ``lax.conv_general_dilated(x, K.todense(), strides, padding,
    rhs_dilation=dilation, feature_group_count=groups)`` with dimension numbers
    ``(layout, "OIHW", layout)``.

    Args:
      x: ``[B, C, H, W]`` (``layout="NCHW"``) or ``[B, H, W, C]`` (``"NHWC"``); float32,
        float64, or bfloat16/float16 storage with float32 accumulation.
      K: :class:`SparseConvKernel` of shape ``[O, C / groups, KH, KW]``.
      strides, dilation: an int or a pair (filter dilation, as ``rhs_dilation``).
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      groups: feature groups (``feature_group_count``).
      bias: ``None``, a scalar or ``[O]``.
      activation: ``None`` or ``"relu"``.
      layout: ``"NCHW"`` or ``"NHWC"`` (input and output).
    """
    if not isinstance(K, SparseConvKernel):
        raise TypeError(f"sparse_conv2d: K must be a SparseConvKernel, got {type(K).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparse_conv2d: activation must be 'relu' or None, got {activation!r}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"sparse_conv2d: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise TypeError(f"sparse_conv2d: x must have rank 4 ({layout}), got shape {x.shape}")
    _check_features(x, "sparse_conv2d")
    if not isinstance(groups, int | np.integer) or groups < 1:
        raise ValueError(f"sparse_conv2d: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    strides = _pair(strides, "strides")
    dilation = _pair(dilation, "dilation")
    o, cg, kh, kw = K.shape
    c = x.shape[1] if layout == "NCHW" else x.shape[3]
    if c % groups:
        raise ValueError(f"sparse_conv2d: groups ({groups}) must divide the input channels ({c})")
    if o % groups:
        raise ValueError(f"sparse_conv2d: groups ({groups}) must divide the output channels ({o})")
    if c // groups != cg:
        raise ValueError(
            f"sparse_conv2d: input channels {c} / groups {groups} = {c // groups} do not match "
            f"the filter's {cg} input channels per group (filter shape {K.shape})"
        )
    hw = x.shape[2:] if layout == "NCHW" else x.shape[1:3]
    window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = _pads(padding, hw, window, strides)
    acc = _acc_dtype(x.dtype)
    values = jnp.asarray(K.values).astype(acc)
    if bias is None:
        b = jnp.zeros((o,), acc)
    else:
        b = jnp.asarray(bias)
        if b.ndim == 0:
            b = jnp.broadcast_to(b, (o,))
        elif b.shape != (o,):
            raise ValueError(
                f"sparse_conv2d: bias must be a scalar or have shape (O,) = ({o},), got {b.shape}"
            )
        b = b.astype(acc)
    axes = _vma(x, values, b)
    if axes:
        x, values, b = (_match_vma(a, axes) for a in (x, values, b))
    if layout == "NHWC":
        x = jnp.transpose(x, (0, 3, 1, 2))
    y = sparse_conv2d_p.bind(
        x,
        values,
        b,
        structure=K.structure,
        shape=K.shape,
        strides=strides,
        pads=pads,
        dilation=dilation,
        groups=groups,
        activation=ACTIVATIONS[activation],
    )
    return jnp.transpose(y, (0, 2, 3, 1)) if layout == "NHWC" else y


# -- shape rule --------------------------------------------------------------------------------


def _abstract_eval(
    x, values, bias, *, structure, shape, strides, pads, dilation, groups, activation
):
    if x.ndim != 4:
        raise TypeError(f"sparse_conv2d: x must be NCHW (rank 4), got rank {x.ndim}")
    if np.dtype(x.dtype) not in _FEATURE_DTYPES:
        raise TypeError(f"sparse_conv2d: unsupported feature dtype {np.dtype(x.dtype).name}")
    o, cg, kh, kw = shape
    if x.shape[1] != cg * groups:
        raise ValueError(
            f"sparse_conv2d: x has {x.shape[1]} channels, the filter expects {cg} x {groups} groups"
        )
    acc = _acc_dtype(x.dtype)
    _expect_operand("sparse_conv2d", "values", values, (structure.nnz,), acc)
    _expect_operand("sparse_conv2d", "bias", bias, (o,), acc)
    oh, ow = conv_output_shape(x.shape[2:], (kh, kw), strides, pads, dilation)
    return x.update(shape=(x.shape[0], o, oh, ow), weak_type=False)


sparse_conv2d_p.def_abstract_eval(_abstract_eval)
sparse_conv2d_p.def_impl(partial(jax._src.dispatch.apply_primitive, sparse_conv2d_p))


# -- lowering ----------------------------------------------------------------------------------


def _out_struct(x, shape, strides, pads, dilation):
    oh, ow = conv_output_shape(x.shape[2:], shape[2:], strides, pads, dilation)
    return jax.ShapeDtypeStruct((x.shape[0], shape[0], oh, ow), x.dtype)


def _attrs(strides, pads, activation):
    return dict(
        stride_h=np.int64(strides[0]),
        stride_w=np.int64(strides[1]),
        pad_top=np.int64(pads[0][0]),
        pad_left=np.int64(pads[1][0]),
        activation=np.int32(activation),
    )


def _cpu_impl(x, values, bias, *, structure, shape, strides, pads, dilation, groups, activation):
    chan, dy, dx, _ = _taps(structure, shape, dilation, groups, tuple(x.shape[2:]))
    return jax.ffi.ffi_call(_TARGET, _out_struct(x, shape, strides, pads, dilation))(
        x,
        values,
        bias,
        jnp.asarray(structure.indptr),
        jnp.asarray(chan),
        jnp.asarray(dy),
        jnp.asarray(dx),
        **_attrs(strides, pads, activation),
    )


# The CUDA kernel's grid: 256 threads of 4 images each per block, at most 65535 pixel blocks
# per launch (gridDim.y); larger batches are split into several launches.
_CUDA_THREADS, _CUDA_IMAGES_PER_THREAD, _CUDA_MAX_PIXEL_BLOCKS = 256, 4, 65535


def _batch_chunks(batch: int, plane_out: int) -> list[tuple[int, int]]:
    """``[start, stop)`` image ranges that each fit one launch of the CUDA kernel."""
    per_launch = _CUDA_MAX_PIXEL_BLOCKS * _CUDA_THREADS // max(plane_out, 1)
    max_images = max(_CUDA_IMAGES_PER_THREAD, per_launch * _CUDA_IMAGES_PER_THREAD)
    return [(b, min(batch, b + max_images)) for b in range(0, batch, max_images)] or [(0, 0)]


# The CUDA tiled kernel (cuda/sparse_conv.cu, opt-in: SPDNN_CONV_KERNEL=tiled): blocks of 32
# strips of P output pixels x 8 warps of 8 output channels; the input rows of a block's strips
# staged per input channel.
TILE_CHANNELS, TILE_WARPS, TILE_STRIPS, TILE_MAX_STAGED = 8, 8, 32, 1024
TILE_KERNEL_WIDTHS = (1, 3, 5)


def tile_plan(batch: int, out_hw, kernel_hw, dtype) -> int | None:
    """Strip length ``P`` of the CUDA tiled kernel for this geometry, or ``None`` where the
    staged rows of a block would not fit it (then the direct kernel runs).

    ``P`` is 8 or 7 (float32 only), whichever wastes fewer lanes on the output width (8 on a
    tie).  A block stages, per input channel, the padded input rows of its 32 strips: at most
    ``TILE_MAX_STAGED`` floats."""
    oh, ow = out_hw
    kh, kw = kernel_hw
    if batch * oh * ow == 0:
        return None
    choices = (8, 7) if np.dtype(dtype) == np.float32 else (8,)
    p = min(choices, key=lambda c: (-(-ow // c) * c, -c))
    spr = -(-ow // p)
    wv = (spr * p + kw - 1) | 1
    strips = batch * oh * spr
    q0 = np.arange(0, strips, TILE_STRIPS, dtype=np.int64)
    ql = np.minimum(q0 + TILE_STRIPS - 1, strips - 1)

    def vrow(q):
        return q // (oh * spr) * (oh + kh - 1) + (q % (oh * spr)) // spr

    span = int((vrow(ql) - vrow(q0)).max()) + kh
    return p if span * wv <= TILE_MAX_STAGED else None


@lru_cache(maxsize=256)
def conv_tile_packing(structure: Structure, shape, groups: int):
    """The filter's nonzeros in the CUDA tiled kernel's order, made once per filter.

    Output channels are cut, within each feature group, into groups of ``TILE_CHANNELS``.
    Returns ``(perm, codes, ptr)``: ``values[perm]`` lists the nonzeros by (channel group,
    input channel in the feature group, filter row), then by channel in the group and filter
    column (so each output channel keeps its CSR order); ``codes[j] = t * KW + s`` (``t`` the
    channel in its group, ``s`` the filter column); nonzeros ``ptr[k]:ptr[k + 1]`` belong to
    the ``k``-th (channel group, input channel, filter row)."""
    o, cg, kh, kw = shape
    og = o // groups
    ngtg = -(-og // TILE_CHANNELS)
    rows = structure.row_ids.astype(np.int64)
    col = structure.indices.astype(np.int64)
    c, rest = np.divmod(col, kh * kw)
    r, s = np.divmod(rest, kw)
    gi, ol = np.divmod(rows, og)
    gtl, t = np.divmod(ol, TILE_CHANNELS)
    key = ((gi * ngtg + gtl) * cg + c) * kh + r
    code = t * kw + s
    perm = np.lexsort((code, key))
    ptr = np.zeros(groups * ngtg * cg * kh + 1, np.int64)
    np.cumsum(np.bincount(key, minlength=ptr.size - 1), out=ptr[1:])
    if ptr[-1] >= 2**31:
        raise ValueError("sparse_conv2d: more than 2^31 - 1 nonzeros")
    return perm.astype(np.int32), code[perm].astype(np.int32), ptr.astype(np.int32)


# "direct" (default): the direct kernel; "tiled": the tiled kernel wherever it applies (it is
# correct and tested, but measured slower than the direct kernel: benchmarks/RESULTS.md).
# Read when a call is lowered.
CONV_KERNELS = ("direct", "tiled")
CUDA_KERNEL = os.environ.get("SPDNN_CONV_KERNEL", "direct")


def _tiled_ok(x, shape, strides, dilation, out_hw) -> int | None:
    if CUDA_KERNEL not in CONV_KERNELS:
        raise ValueError(f"SPDNN_CONV_KERNEL must be one of {CONV_KERNELS}, got {CUDA_KERNEL!r}")
    if CUDA_KERNEL != "tiled":
        return None
    if not _native.has_target(_TILED_TARGET, "cuda"):
        return None
    if strides != (1, 1) or dilation != (1, 1) or shape[3] not in TILE_KERNEL_WIDTHS:
        return None
    if np.dtype(x.dtype) not in (np.float32, jnp.bfloat16, np.float16):
        return None
    return tile_plan(x.shape[0], out_hw, shape[2:], x.dtype)


def _cuda_impl(x, values, bias, *, structure, shape, strides, pads, dilation, groups, activation):
    out = _out_struct(x, shape, strides, pads, dilation)
    strip = _tiled_ok(x, shape, tuple(strides), tuple(dilation), out.shape[2:])
    if strip is not None:
        perm, codes, ptr = conv_tile_packing(structure, shape, groups)
        vals = lax.bitcast_convert_type(values.astype(jnp.float32)[jnp.asarray(perm)], jnp.int32)
        recs = jnp.stack([jnp.asarray(codes), vals], axis=1)
        return jax.ffi.ffi_call(_TILED_TARGET, out)(
            x,
            recs,
            jnp.asarray(ptr),
            bias.astype(jnp.float32),
            pad_top=np.int64(pads[0][0]),
            pad_left=np.int64(pads[1][0]),
            kernel_h=np.int64(shape[2]),
            kernel_w=np.int64(shape[3]),
            groups=np.int64(groups),
            strip=np.int64(strip),
            activation=np.int32(activation),
        )
    *_, records = _taps(structure, shape, dilation, groups, tuple(x.shape[2:]))

    def launch(xc):
        part = jax.ShapeDtypeStruct((xc.shape[0],) + out.shape[1:], out.dtype)
        return jax.ffi.ffi_call(_TARGET, part)(
            xc,
            jnp.asarray(records),
            values,
            bias,
            jnp.asarray(structure.indptr),
            **_attrs(strides, pads, activation),
        )

    chunks = _batch_chunks(x.shape[0], out.shape[2] * out.shape[3])
    if len(chunks) == 1:
        return launch(x)
    return jnp.concatenate([launch(x[a:b]) for a, b in chunks], axis=0)


if _native.has_target(_TARGET, "cpu"):
    mlir.register_lowering(
        sparse_conv2d_p, mlir.lower_fun(_cpu_impl, multiple_results=False), platform="cpu"
    )
if _native.has_target(_TARGET, "cuda"):
    mlir.register_lowering(
        sparse_conv2d_p, mlir.lower_fun(_cuda_impl, multiple_results=False), platform="cuda"
    )


# -- autodiff ----------------------------------------------------------------------------------


def _dense_conv(x, values, *, structure, shape, strides, pads, dilation, groups):
    """The same linear convolution through XLA's dense convolution (for the backward pass)."""
    k = SparseConvKernel.tree_unflatten((structure, shape), (values,)).todense()
    return lax.conv_general_dilated(
        x,
        k.astype(x.dtype),
        strides,
        pads,
        rhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )


def _jvp(primals, tangents, **params):
    x, values, bias = primals
    dx, dv, db = tangents
    y = sparse_conv2d_p.bind(x, values, bias, **params)
    linear = dict(params, activation=0)
    zero_b = jnp.zeros_like(bias)
    t = None
    if type(dx) is not ad.Zero:
        t = sparse_conv2d_p.bind(dx, values, zero_b, **linear)
    if type(dv) is not ad.Zero:
        tv = sparse_conv2d_p.bind(x, dv, zero_b, **linear)
        t = tv if t is None else t + tv
    if type(db) is not ad.Zero:
        tb = jnp.broadcast_to(db.astype(y.dtype)[None, :, None, None], y.shape)
        t = tb if t is None else t + tb
    if t is None:
        return y, ad.Zero.from_primal_value(y)
    t = t.astype(y.dtype)
    if params["activation"] == 1:
        t = jnp.where(y > 0, t, jnp.zeros_like(t))
    return y, t


def _transpose(
    ct, x, values, bias, *, structure, shape, strides, pads, dilation, groups, activation
):
    if activation != 0:
        raise NotImplementedError("sparse_conv2d is only linear without activation")
    if ad.is_undefined_primal(bias):
        raise NotImplementedError("sparse_conv2d: transpose with respect to bias")
    if type(ct) is ad.Zero:
        return None, None, None
    geom = dict(
        structure=structure,
        shape=shape,
        strides=strides,
        pads=pads,
        dilation=dilation,
        groups=groups,
    )
    ct_x = ct_v = None
    # Cotangents carry the varying type of their primal (inside shard_map).
    if ad.is_undefined_primal(x):
        aval = x.aval
        zero = _match_vma(jnp.zeros(aval.shape, aval.dtype), _aval_vma(aval))
        _, vjp = jax.vjp(lambda x_: _dense_conv(x_, values, **geom), zero)
        (ct_x,) = vjp(ct.astype(aval.dtype))
    if ad.is_undefined_primal(values):
        aval = values.aval
        zero = _match_vma(jnp.zeros(aval.shape, aval.dtype), _aval_vma(aval))
        _, vjp = jax.vjp(lambda v_: _dense_conv(x, v_, **geom), zero)
        (ct_v,) = vjp(ct.astype(x.dtype))
        ct_v = ct_v.astype(aval.dtype)
    return ct_x, ct_v, None


ad.primitive_jvps[sparse_conv2d_p] = _jvp
ad.primitive_transposes[sparse_conv2d_p] = _transpose


# -- batching ----------------------------------------------------------------------------------


def _batch(args, dims, **params):
    x, values, bias = args
    xd, vd, bd = dims
    if vd is None and bd is None:
        # Batching over images only: fold the vmapped axis into the image axis.
        x = jnp.moveaxis(x, xd, 0)
        k, n = x.shape[:2]
        out = sparse_conv2d_p.bind(x.reshape((k * n,) + x.shape[2:]), values, bias, **params)
        return out.reshape((k, n) + out.shape[1:]), 0
    # Batched filters or biases: one launch per member (the filter structure is shared).
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def take(a, d, i):
        return a if d is None else lax.index_in_dim(a, i, d, keepdims=False)

    outs = [
        sparse_conv2d_p.bind(take(x, xd, i), take(values, vd, i), take(bias, bd, i), **params)
        for i in range(size)
    ]
    return jnp.stack(outs), 0


batching.primitive_batchers[sparse_conv2d_p] = _batch
