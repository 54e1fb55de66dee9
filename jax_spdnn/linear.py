"""``sparse_linear``: the fused sparse layer ``y = min(act(x @ W + b), clip)``.

A JAX primitive with a shape rule, CPU and CUDA lowerings to XLA FFI kernels,
a batching rule and JVP/transpose rules, so it composes with ``jit``, ``vmap``,
``grad`` and ``shard_map`` like a ``lax`` op.

Numerics: float32 and float64 features accumulate in their own precision;
bfloat16 and float16 features are stored in half precision and accumulate in
float32.  ``W``'s values and the bias are cast to the accumulation dtype.
Every output is summed in a fixed order (deterministic; no atomics).
"""

from __future__ import annotations

import math
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_spdnn import _native
from jax_spdnn.sparse import SparseMatrix, Structure

__all__ = ["sparse_linear", "sparse_linear_p", "ACTIVATIONS"]

_CPU_TARGET = "spdnn_sparse_linear_csr"
_CUDA_TARGET = "spdnn_sparse_linear_ell"
ACTIVATIONS = {None: 0, "none": 0, "linear": 0, "relu": 1}
_FEATURE_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16))
_CUDA_FOOTPRINT_TARGET = "spdnn_sparse_dnn_footprint"
_CUDA_STATIONARY_TARGET = "spdnn_sparse_linear_stationary"
LINEAR_KERNELS = ("auto", "layer", "footprint", "stationary")


def linear_kernel() -> str:
    """The CUDA kernel of ``sparse_linear`` (``SPDNN_LINEAR_KERNEL``, read when a call is
    lowered):

    - ``layer``: the layer kernel (every dtype and shape);
    - ``footprint``: square ReLU layers through ``SparseDNN``'s footprint kernel as a
      one-layer network (the same sums in the same order: bitwise equal results to the
      layer kernel), other layers through the layer kernel;
    - ``stationary``: float32, bfloat16 and float16 features with
      ``n_in <= STATIONARY_MAX_IN`` through the stationary-rows kernel (whole feature rows
      in shared memory; sums in the order of a bank schedule, so results differ from the
      layer kernel by rounding), others through the layer kernel;
    - ``auto`` (the default): see :func:`cuda_route`."""
    kernel = os.environ.get("SPDNN_LINEAR_KERNEL", "auto")
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"SPDNN_LINEAR_KERNEL must be one of {LINEAR_KERNELS}, got {kernel!r}")
    return kernel


def _check_features(x, who: str) -> None:
    """The feature-dtype check every op makes, with the op's name in the message."""
    if np.dtype(x.dtype) not in _FEATURE_DTYPES:
        raise TypeError(
            f"{who}: x must be float32, float64, bfloat16 or float16, got {np.dtype(x.dtype).name}"
        )


sparse_linear_p = Primitive("sparse_linear")


def _acc_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _aval_vma(aval) -> frozenset:
    """The mesh axes an abstract value varies over inside ``shard_map`` (empty outside)."""
    vma = getattr(aval, "vma", None)  # name differs across jax versions
    if vma is None:
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def _vma(*xs) -> frozenset:
    out: frozenset = frozenset()
    for x in xs:
        out |= _aval_vma(jax.typeof(x))
    return out


def _match_vma(x, axes: frozenset):
    """Marks ``x`` varying over ``axes`` (inside ``shard_map``) so autodiff sums it."""
    missing = tuple(sorted(axes - _vma(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x


def sparse_linear(x, W: SparseMatrix, bias=None, *, activation: str | None = "relu", clip=None):
    """Fused sparse layer ``y = min(act(x @ W + bias), clip)``.

    Args:
      x: ``[..., n_in]`` features, float32, float64, bfloat16 or float16.
      W: :class:`SparseMatrix` of shape ``[n_in, n_out]``.
      bias: ``None``, a scalar, or ``[n_out]``; cast to the accumulation dtype.
      activation: ``"relu"`` (default) or ``None``.
      clip: upper clamp applied after the activation, or ``None``.

    Returns:
      ``[..., n_out]`` with ``x``'s dtype.  Accumulation is float64 for float64
      features and float32 otherwise.
    """
    if not isinstance(W, SparseMatrix):
        raise TypeError(f"sparse_linear: W must be a SparseMatrix, got {type(W).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"sparse_linear: activation must be one of 'relu' or None, got {activation!r}"
        )
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise TypeError("sparse_linear: x must have rank >= 1 ([..., n_in]), got a scalar")
    _check_features(x, "sparse_linear")
    if x.shape[-1] != W.n_in:
        raise ValueError(
            f"sparse_linear: x's last dimension {x.shape[-1]} does not match W's n_in "
            f"{W.n_in} (x: {x.shape}, W: {W.shape})"
        )
    acc = _acc_dtype(x.dtype)
    values = jnp.asarray(W.values).astype(acc)
    if bias is None:
        b = jnp.zeros((W.n_out,), acc)
    else:
        b = jnp.asarray(bias)
        if not (jnp.issubdtype(b.dtype, jnp.floating) or jnp.issubdtype(b.dtype, jnp.integer)):
            raise TypeError(f"sparse_linear: bias must be real, got {b.dtype}")
        if b.ndim == 0:
            b = jnp.broadcast_to(b, (W.n_out,))
        elif b.shape != (W.n_out,):
            raise ValueError(
                f"sparse_linear: bias must be a scalar or have shape (n_out,) = ({W.n_out},), "
                f"got {b.shape}"
            )
        b = b.astype(acc)
    if clip is None:
        clip_v = math.inf
    else:
        try:
            clip_v = float(clip)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError("sparse_linear: clip must be a static Python number") from e
        if math.isnan(clip_v):
            raise ValueError("sparse_linear: clip must not be NaN")
    axes = _vma(x, values, b)
    if axes:
        x, values, b = (_match_vma(a, axes) for a in (x, values, b))
    return sparse_linear_p.bind(
        x, values, b, structure=W.structure, activation=ACTIVATIONS[activation], clip=clip_v
    )


def _expect_operand(op: str, name: str, aval, shape: tuple, dtype) -> None:
    """Shape-rule check of a weight operand: ``TypeError`` naming it unless it is
    ``dtype[shape]``."""
    if tuple(aval.shape) != tuple(shape) or np.dtype(aval.dtype) != np.dtype(dtype):
        raise TypeError(
            f"{op}: {name} must be {np.dtype(dtype).name}{list(shape)}, got "
            f"{np.dtype(aval.dtype).name}{list(aval.shape)}"
        )


# -- shape rule ----------------------------------------------------------------


def _abstract_eval(x, values, bias, *, structure: Structure, activation: int, clip: float):
    if x.ndim < 1:
        raise TypeError("sparse_linear: x must have rank >= 1")
    if np.dtype(x.dtype) not in _FEATURE_DTYPES:
        raise TypeError(f"sparse_linear: unsupported feature dtype {np.dtype(x.dtype).name}")
    if x.shape[-1] != structure.n_in:
        raise ValueError(
            f"sparse_linear: x's last dimension {x.shape[-1]} does not match n_in {structure.n_in}"
        )
    acc = _acc_dtype(x.dtype)
    _expect_operand("sparse_linear", "values", values, (structure.nnz,), acc)
    _expect_operand("sparse_linear", "bias", bias, (structure.n_out,), acc)
    # Derived from x's aval so sharding and shard_map's varying type propagate;
    # the public wrapper makes x, values and bias vary over the same axes.
    return x.update(shape=x.shape[:-1] + (structure.n_out,), weak_type=False)


sparse_linear_p.def_abstract_eval(_abstract_eval)
sparse_linear_p.def_impl(partial(jax._src.dispatch.apply_primitive, sparse_linear_p))


# -- lowering ------------------------------------------------------------------


def _ffi(target, structure, x, packed_values, bias, index_a, index_b, activation, clip):
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (structure.n_out,), x.dtype)
    return jax.ffi.ffi_call(target, out)(
        x,
        packed_values,
        bias,
        jnp.asarray(index_a),
        jnp.asarray(index_b),
        activation=np.int32(activation),
        clip=np.float64(clip),
    )


def _cpu_impl(x, values, bias, *, structure: Structure, activation: int, clip: float):
    # CPU kernel reads the CSR arrays directly.
    return _ffi(
        _CPU_TARGET,
        structure,
        x,
        values,
        bias,
        structure.indptr,
        structure.indices,
        activation,
        clip,
    )


# The layer kernel stages whole input rows once per this many outputs (a block's group).
_LAYER_GROUP = 1024
# Smallest layer auto sends through the footprint kernel: below it the route's row moves
# (interleave in, de-interleave out) cost more than the staging it saves (H100: 1024
# neurons, generated challenge layer, 1.02 ms layer kernel against 1.72 ms).
LINEAR_FOOTPRINT_MIN_N = 4096


def footprint_pays(structure: Structure) -> bool:
    """Whether the footprint packing of this (square) layer stages at most half the input
    columns per feature row that the layer kernel stages (``ceil(n_out / 1024) * n_in``).
    Layers whose outputs share inputs (the Graph Challenge's, structured pruning) do;
    random patterns do not (at 16384 neurons, 32 random inputs per output: 1.5x *more*).
    Packs the footprint (cached on the structure)."""
    from jax_spdnn.sparse import footprint_group

    layer_cols = -(-structure.n_out // _LAYER_GROUP) * structure.n_in
    return 2 * structure.footprint(footprint_group()).staged <= layer_cols


# Feature dtypes of the stationary kernel (half precision staged as float32).
_STATIONARY_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
# Largest n_in auto sends through the stationary kernel: three feature rows per block in
# shared memory (H100: 227 KB per block; fewer rows reload the weights too often).
STATIONARY_AUTO_MAX_IN = 16384
STATIONARY_AUTO_MIN_ROWS = 3
# Per-block shared memory (opt-in limit, bytes) by compute capability, for devices whose limit
# is below Hopper's: the stationary kernel fits fewer rows there.
_SMEM_OPTIN = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024}
_SMEM_OPTIN_DEFAULT = 227 * 1024  # sm_90 and sm_100


def _smem_optin() -> int:
    """The first CUDA device's per-block shared-memory limit (Hopper's where JAX sees no CUDA
    device, e.g. when lowering for CUDA on a CPU-only machine)."""
    try:
        cc = jax.devices("cuda")[0].compute_capability
        major, minor = (int(v) for v in str(cc).split(".")[:2])
    except Exception:  # no CUDA device or no capability attribute
        return _SMEM_OPTIN_DEFAULT
    return _SMEM_OPTIN.get((major, minor), _SMEM_OPTIN_DEFAULT)


def _footprint_fits(structure: Structure, activation: int) -> bool:
    return (
        activation == ACTIVATIONS["relu"]
        and structure.n_in == structure.n_out
        and _native.has_target(_CUDA_FOOTPRINT_TARGET, "cuda")
    )


def _stationary_fits(structure: Structure, dtype) -> bool:
    from jax_spdnn.sparse import STATIONARY_MAX_IN

    return (
        np.dtype(dtype) in _STATIONARY_DTYPES
        and structure.n_in <= STATIONARY_MAX_IN
        and _native.has_target(_CUDA_STATIONARY_TARGET, "cuda")
    )


def cuda_route(structure: Structure, activation: int, dtype) -> str:
    """The CUDA kernel a layer lowers to: ``"layer"``, ``"footprint"`` or ``"stationary"``.

    Under ``SPDNN_LINEAR_KERNEL=auto`` (the default): layers with float32, bfloat16 or
    float16 features and at most ``STATIONARY_AUTO_MAX_IN`` inputs take the stationary
    kernel where ``STATIONARY_AUTO_MIN_ROWS`` feature rows fit the device's shared memory
    (all of them on Hopper; up to 13900 inputs on an A100); larger float32 square
    ReLU layers from ``LINEAR_FOOTPRINT_MIN_N`` neurons take the footprint route where
    :func:`footprint_pays`; everything else the layer kernel."""
    kernel = linear_kernel()
    if kernel == "stationary":
        return "stationary" if _stationary_fits(structure, dtype) else "layer"
    if kernel == "footprint":
        return "footprint" if _footprint_fits(structure, activation) else "layer"
    if kernel == "layer":
        return "layer"
    if (
        _stationary_fits(structure, dtype)
        and structure.n_in <= STATIONARY_AUTO_MAX_IN
        and STATIONARY_AUTO_MIN_ROWS * structure.n_in * 4 <= _smem_optin()
    ):
        return "stationary"
    if (
        _footprint_fits(structure, activation)
        and np.dtype(dtype) == np.float32
        and structure.n_out >= LINEAR_FOOTPRINT_MIN_N
        and footprint_pays(structure)
    ):
        return "footprint"
    return "layer"


def stationary_schedule() -> bool:
    """Whether the stationary kernel's packing is bank-scheduled (``SPDNN_STAT_SCHEDULE``,
    read when a call is lowered: ``1``, the default, or ``0`` for CSR order, for A/B runs)."""
    value = os.environ.get("SPDNN_STAT_SCHEDULE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"SPDNN_STAT_SCHEDULE must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_stationary(x, values, bias, structure: Structure, activation: int, clip: float):
    # Packed once per structure (cached per schedule); values gathered per call.
    pack = structure.stationary(stationary_schedule())
    return _ffi(
        _CUDA_STATIONARY_TARGET,
        structure,
        x,
        pack.pack_values(values),
        bias,
        pack.group_ptr,
        pack.indices,
        activation,
        clip,
    )


def _cuda_footprint(x, values, bias, structure: Structure, clip: float):
    # A one-layer SparseDNN call with dead rows kept: the footprint kernel's packing
    # (cached per structure), rows in interleaved tiles inside the call.
    from jax_spdnn.dnn import _call_cuda_fp, _fp_layout
    from jax_spdnn.sparse import footprint_group

    group = footprint_group()
    fp = structure.footprint(group)
    index, offsets = _fp_layout([fp])
    n = structure.n_out
    x2 = x.reshape(-1, n)
    y, _ = _call_cuda_fp(
        x2, fp.pack_values(values), bias[None, :], *index, *offsets, clip, False, group
    )
    return y.reshape(x.shape)


def _cuda_impl(x, values, bias, *, structure: Structure, activation: int, clip: float):
    route = cuda_route(structure, activation, x.dtype)
    if route == "stationary":
        return _cuda_stationary(x, values, bias, structure, activation, clip)
    if route == "footprint":
        return _cuda_footprint(x, values, bias, structure, clip)
    # CUDA kernel reads warp-sliced ELL: the structure is packed once (cached),
    # the values are gathered into the packed order here, per call.
    ell = structure.sliced_ell
    return _ffi(
        _CUDA_TARGET,
        structure,
        x,
        ell.pack_values(values),
        bias,
        ell.slice_ptr,
        ell.indices,
        activation,
        clip,
    )


if _native.has_target(_CPU_TARGET, "cpu"):
    mlir.register_lowering(
        sparse_linear_p, mlir.lower_fun(_cpu_impl, multiple_results=False), platform="cpu"
    )
if _native.has_target(_CUDA_TARGET, "cuda"):
    mlir.register_lowering(
        sparse_linear_p, mlir.lower_fun(_cuda_impl, multiple_results=False), platform="cuda"
    )


# -- autodiff ------------------------------------------------------------------


def _linear(x, values, structure: Structure):
    """The bias-free, activation-free product ``x @ W`` (linear in each argument)."""
    zero = jnp.zeros((structure.n_out,), values.dtype)
    return sparse_linear_p.bind(x, values, zero, structure=structure, activation=0, clip=math.inf)


def _jvp(primals, tangents, *, structure: Structure, activation: int, clip: float):
    x, values, bias = primals
    dx, dv, db = tangents
    y = sparse_linear_p.bind(x, values, bias, structure=structure, activation=activation, clip=clip)
    t = None

    def add(a, b):
        return b if a is None else a + b

    if type(dx) is not ad.Zero:
        t = add(t, _linear(dx, values, structure))
    if type(dv) is not ad.Zero:
        t = add(t, _linear(x, dv, structure))
    if type(db) is not ad.Zero:
        t = add(t, jnp.broadcast_to(db.astype(y.dtype), y.shape))
    if t is None:
        return y, ad.Zero.from_primal_value(y)
    t = t.astype(y.dtype)
    if activation == 1 or math.isfinite(clip):
        live = jnp.ones(y.shape, bool)
        if activation == 1:
            live = live & (y > 0)
        if math.isfinite(clip):
            live = live & (y < clip)
        t = jnp.where(live, t, jnp.zeros_like(t))
    return y, t


_SDDMM_CHUNK_ELEMENTS = 1 << 24  # gathered [rows, nnz] elements per step (64 MB in float32)


def _sddmm(x, g, structure: Structure, dtype):
    """``dW[k] = sum_b x[b, indices[k]] * g[b, row(k)]``: the values' cotangent.

    The gathered ``[rows, nnz]`` products are summed in row chunks so that memory stays
    bounded for large batches (a sequential scan; order fixed, so deterministic)."""
    x2 = x.reshape(-1, structure.n_in).astype(dtype)
    g2 = g.reshape(-1, structure.n_out).astype(dtype)
    cols, rows = jnp.asarray(structure.indices), jnp.asarray(structure.row_ids)

    def part(xc, gc):
        return jnp.einsum("bk,bk->k", jnp.take(xc, cols, axis=1), jnp.take(gc, rows, axis=1))

    chunk = max(1, _SDDMM_CHUNK_ELEMENTS // max(structure.nnz, 1))
    n = x2.shape[0]
    if n <= chunk:
        return part(x2, g2)
    pad = (-n) % chunk
    x3 = jnp.pad(x2, ((0, pad), (0, 0))).reshape(-1, chunk, structure.n_in)
    g3 = jnp.pad(g2, ((0, pad), (0, 0))).reshape(-1, chunk, structure.n_out)
    total, _ = lax.scan(
        lambda acc, xg: (acc + part(*xg), None), jnp.zeros((structure.nnz,), dtype), (x3, g3)
    )
    return total


def _transpose(ct, x, values, bias, *, structure: Structure, activation: int, clip: float):
    if activation != 0 or math.isfinite(clip):
        raise NotImplementedError("sparse_linear is only linear without activation and clip")
    if ad.is_undefined_primal(bias):
        raise NotImplementedError("sparse_linear: transpose with respect to bias")
    if type(ct) is ad.Zero:
        return None, None, None
    ct_x = ct_v = None
    if ad.is_undefined_primal(x):
        st, perm = structure.transpose
        vt = jnp.take(values, jnp.asarray(perm))
        ct_x = _linear(ct, vt, st).astype(x.aval.dtype)
    if ad.is_undefined_primal(values):
        ct_v = _sddmm(x, ct, structure, values.aval.dtype)
    return ct_x, ct_v, None


ad.primitive_jvps[sparse_linear_p] = _jvp
ad.primitive_transposes[sparse_linear_p] = _transpose


# -- batching ------------------------------------------------------------------


def _batch(args, dims, *, structure: Structure, activation: int, clip: float):
    x, values, bias = args
    xd, vd, bd = dims
    if vd is None and bd is None:
        # Batching over features only: fold the batch axis into the rows.
        x = jnp.moveaxis(x, xd, 0)
        out = sparse_linear_p.bind(
            x, values, bias, structure=structure, activation=activation, clip=clip
        )
        return out, 0
    # Batched weights or bias: one launch over a block-diagonal matrix whose
    # k-th block is the k-th weight set; features are laid side by side.
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if xd is None:
        x = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (size, structure.n_in))
    else:
        x = jnp.moveaxis(x, xd, -2)
    lead = x.shape[:-2]
    x = x.reshape(lead + (size * structure.n_in,))
    values = (
        jnp.broadcast_to(values, (size, structure.nnz))
        if vd is None
        else jnp.moveaxis(values, vd, 0)
    )
    bias = (
        jnp.broadcast_to(bias, (size, structure.n_out)) if bd is None else jnp.moveaxis(bias, bd, 0)
    )
    out = sparse_linear_p.bind(
        x,
        values.reshape(-1),
        bias.reshape(-1),
        structure=structure.block_diag(size),
        activation=activation,
        clip=clip,
    )
    out = out.reshape(lead + (size, structure.n_out))
    return out, out.ndim - 2


batching.primitive_batchers[sparse_linear_p] = _batch
