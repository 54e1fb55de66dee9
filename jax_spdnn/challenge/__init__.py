"""Sparse DNN Graph Challenge: network and input generation (more to come:
official file formats, reference inference, truth check)."""

from jax_spdnn.challenge.generate import (
    CHALLENGE_BIAS,
    challenge_bias,
    radixnet,
    radixnet_layer,
    random_inputs,
)

__all__ = ["CHALLENGE_BIAS", "challenge_bias", "radixnet", "radixnet_layer", "random_inputs"]
