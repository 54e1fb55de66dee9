"""jax_spdnn: fast inference with sparse neural networks in JAX.

Fused sparse layers (``sparse_linear``) and whole networks with dead rows dropped on the
device (``SparseDNN``) and direct sparse convolution of pruned CNN filters (``sparse_conv2d``)
run as XLA FFI kernels on CPU and CUDA, composing with ``jax.jit``,
``jax.vmap``, ``jax.grad`` and ``jax.shard_map`` (``jax_spdnn.distributed``).  The Sparse DNN
Graph Challenge tools (file formats, generators, reference, truth check) are in
``jax_spdnn.challenge``.
"""

from jax_spdnn import _native as _native  # noqa: F401  (registers the FFI targets)
from jax_spdnn import challenge, distributed
from jax_spdnn._native import cuda_available, cuda_status
from jax_spdnn.conv import (
    SparseConvKernel,
    conv_output_shape,
    magnitude_threshold,
    prune_global,
    sparse_conv2d,
    sparse_conv2d_p,
)
from jax_spdnn.dnn import DNNResult, SparseDNN
from jax_spdnn.linear import sparse_linear, sparse_linear_p
from jax_spdnn.sparse import (
    BankSplitPack,
    EllPack,
    FootprintPack,
    SharedSetPack,
    SparseMatrix,
    StationaryPack,
    Structure,
    TensorCoreTiles,
    footprint_order,
    pack_bank_split,
    pack_footprint,
    pack_shared_sets,
    pack_sliced_ell,
    pack_stationary,
    tensor_core_tiles,
)
from jax_spdnn.stream import stream_network

__version__ = "0.1.0"

__all__ = [
    "DNNResult",
    "SparseDNN",
    "stream_network",
    "challenge",
    "distributed",
    "BankSplitPack",
    "EllPack",
    "FootprintPack",
    "footprint_order",
    "pack_bank_split",
    "pack_footprint",
    "tensor_core_tiles",
    "TensorCoreTiles",
    "pack_shared_sets",
    "pack_sliced_ell",
    "pack_stationary",
    "SharedSetPack",
    "StationaryPack",
    "SparseConvKernel",
    "SparseMatrix",
    "Structure",
    "conv_output_shape",
    "magnitude_threshold",
    "prune_global",
    "sparse_conv2d",
    "sparse_conv2d_p",
    "cuda_available",
    "cuda_status",
    "sparse_linear",
    "sparse_linear_p",
]
