"""Loads the compiled kernel modules and registers every FFI target once.

The CPU module is always built.  The CUDA module exists only where the package
was built with nvcc; without it (or without a CUDA-enabled jaxlib) the package
works on CPU and simply has no CUDA lowering.
"""

from __future__ import annotations

import importlib

import jax

_REGISTERED: dict[str, set[str]] = {"cpu": set(), "cuda": set()}
_CUDA_IMPORT_ERROR: str | None = None


def _register(module_name: str, platform: str, key: str) -> None:
    global _CUDA_IMPORT_ERROR
    try:
        module = importlib.import_module(f"jax_spdnn.{module_name}")
    except ImportError as e:  # CUDA module absent: CPU-only build
        if key == "cuda":
            _CUDA_IMPORT_ERROR = str(e)
            return
        raise
    for name, capsule in module.registrations().items():
        try:
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        except Exception as e:  # jaxlib without that platform's plugin
            if key == "cuda":
                _CUDA_IMPORT_ERROR = f"registering {name}: {e}"
                return
            raise
        _REGISTERED[key].add(name)


_register("_spdnn_cpu", "cpu", "cpu")
_register("_spdnn_cuda", "CUDA", "cuda")


def has_target(name: str, platform: str) -> bool:
    """Whether FFI target ``name`` is registered for ``platform`` ('cpu' or 'cuda')."""
    return name in _REGISTERED[platform]


def cuda_built() -> bool:
    """Whether the CUDA kernels were built and registered with this jaxlib."""
    return bool(_REGISTERED["cuda"])


def cuda_available() -> bool:
    """Whether CUDA kernels are registered *and* JAX sees a CUDA device."""
    if not cuda_built():
        return False
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


def cuda_status() -> str:
    """A one-line explanation of the CUDA module's state, for diagnostics."""
    if cuda_available():
        return f"CUDA kernels registered; devices: {jax.devices('cuda')}"
    if cuda_built():
        return "CUDA kernels built, but JAX has no CUDA device (install jax[cuda13])"
    return f"no CUDA kernels ({_CUDA_IMPORT_ERROR or 'module not built'})"
