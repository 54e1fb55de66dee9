"""Shared test fixtures: float64 enabled, four virtual CPU devices, and a ``device``
fixture that runs a test on the CPU and, where JAX sees one, on a CUDA GPU (skipped
otherwise); GPU memory allocated on demand."""

import os

# GPU memory on demand, not 75% of it at the first use: the CLI and notebook tests start
# child processes that need the device too (they inherit this).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Four virtual CPU devices for the sharding tests (must be set before the backend starts).
jax.config.update("jax_num_cpu_devices", 4)

import jax_spdnn  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def _devices():
    params = [pytest.param("cpu", id="cpu")]
    params.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not jax_spdnn.cuda_available(), reason="needs a CUDA device and CUDA kernels"
                ),
            ],
        )
    )
    return params


@pytest.fixture(params=_devices())
def device(request):
    """The jax.Device a test runs on; also made the default device."""
    dev = jax.devices(request.param)[0]
    with jax.default_device(dev):
        yield dev


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
