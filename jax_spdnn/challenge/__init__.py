"""Sparse DNN Graph Challenge: official file formats, generated networks and inputs,
the float64 reference and the truth check."""

from jax_spdnn.challenge.generate import (
    CHALLENGE_BIAS,
    RadixNetLayers,
    challenge_bias,
    digit_inputs,
    radixnet,
    radixnet_layer,
    random_inputs,
)
from jax_spdnn.challenge.io import (
    read_categories,
    read_images,
    read_layer,
    read_layers,
    write_categories,
    write_images,
    write_layer,
    write_layers,
)
from jax_spdnn.challenge.reference import (
    ReferenceResult,
    TruthCheck,
    check_categories,
    reference_inference,
    reference_inference_fast,
)

__all__ = [
    "CHALLENGE_BIAS",
    "RadixNetLayers",
    "ReferenceResult",
    "TruthCheck",
    "challenge_bias",
    "check_categories",
    "radixnet",
    "radixnet_layer",
    "digit_inputs",
    "random_inputs",
    "read_categories",
    "read_images",
    "read_layer",
    "read_layers",
    "reference_inference",
    "reference_inference_fast",
    "write_categories",
    "write_images",
    "write_layer",
    "write_layers",
]
