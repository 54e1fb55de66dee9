"""Flax (``flax.linen``) layer for pruned convolutions: :class:`SparseConv`.

Optional: needs ``flax`` (``pip install flax``).  ``SparseConv`` drops into a Flax model where
an ``nn.Conv`` was, with a fixed sparsity pattern: its parameters are the filter's nonzero
``values`` (and ``bias``), so ``jax.grad`` fine-tunes only the weights that survived pruning.
Like ``nn.Conv`` it defaults to NHWC features.

Typical use after training a dense model::

    K = SparseConvKernel.from_hwio(params["Conv_0"]["kernel"], sparsity=0.9)
    layer = SparseConv.from_kernel(K, padding="SAME")
    layer_params = {"values": K.values, "bias": params["Conv_0"]["bias"]}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jax_spdnn.conv import SparseConvKernel, sparse_conv2d
from jax_spdnn.sparse import Structure

__all__ = ["SparseConv"]


class SparseConv(nn.Module):
    """A 2-D convolution with a fixed sparse filter pattern, run by :func:`sparse_conv2d`.

    Attributes:
      structure: the pattern (``SparseConvKernel.structure``).
      kernel_shape: ``(O, C / groups, KH, KW)``.
      strides, padding, kernel_dilation, feature_group_count: as ``nn.Conv``
        (``padding``: "SAME", "VALID" or ``((top, bottom), (left, right))``).
      use_bias: add a learned bias ``[O]``.
      activation: ``None`` or ``"relu"`` (fused into the kernel).
      layout: "NHWC" (Flax's default) or "NCHW".
      values_init, bias_init: initializers of the nonzero values ``[nnz]`` and the bias.
    """

    structure: Structure
    kernel_shape: tuple[int, int, int, int]
    strides: int | tuple[int, int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | tuple[int, int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    activation: str | None = None
    layout: str = "NHWC"
    param_dtype: Any = jnp.float32
    values_init: Callable = nn.initializers.normal(0.05)
    bias_init: Callable = nn.initializers.zeros_init()

    @classmethod
    def from_kernel(cls, kernel: SparseConvKernel, **kwargs) -> SparseConv:
        """A layer with ``kernel``'s pattern whose values initialize to ``kernel``'s."""
        values = np.asarray(kernel.values)
        return cls(
            structure=kernel.structure,
            kernel_shape=kernel.shape,
            values_init=lambda key, shape, dtype=jnp.float32: jnp.asarray(values, dtype),
            **kwargs,
        )

    @nn.compact
    def __call__(self, x):
        values = self.param("values", self.values_init, (self.structure.nnz,), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.kernel_shape[0],), self.param_dtype)
        K = SparseConvKernel.tree_unflatten((self.structure, tuple(self.kernel_shape)), (values,))
        return sparse_conv2d(
            x,
            K,
            strides=self.strides,
            padding=self.padding,
            dilation=self.kernel_dilation,
            groups=self.feature_group_count,
            bias=bias,
            activation=self.activation,
            layout=self.layout,
        )
