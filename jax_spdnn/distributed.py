"""Scale-out with JAX's own runtime: weights replicated, feature rows (the batch) split.

- :func:`batch_mesh` builds a 1-D mesh over devices (all of them by default).
- :func:`shard` turns a function of a feature batch (``sparse_linear`` layers, a
  :class:`~jax_spdnn.SparseDNN`, or any composition) into a jitted ``jax.shard_map`` over
  that mesh: each device runs the native kernels on its rows, nothing is all-gathered.
  Batches that do not divide the device count are padded with zero rows and trimmed.
- :func:`initialize` starts the multi-process runtime (``jax.distributed.initialize``);
  with one process per host (or several on one machine) the same ``shard`` code runs
  over every process's devices, with inputs built by
  ``jax.make_array_from_process_local_data``.

Gradients under ``shard`` equal single-device gradients: ``sparse_linear`` marks
replicated weights as varying over the batch axis, so their cotangents are summed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_spdnn.dnn import DNNResult, SparseDNN

__all__ = ["batch_mesh", "initialize", "shard"]


def batch_mesh(devices=None, axis: str = "batch") -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (axis,))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """Starts JAX's multi-process runtime (arguments as ``jax.distributed.initialize``;
    all ``None`` lets JAX detect a cluster).  CPU-only runs use ``cpu_collectives``."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _pad_rows(x, multiple: int):
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x, 0
    return jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]), pad


def shard(fn: Callable | SparseDNN, mesh: Mesh, *, axis: str | None = None) -> Callable:
    """Runs ``fn(x)`` with the rows of ``x`` split over ``mesh``'s ``axis``, jitted.

    ``fn`` is a :class:`SparseDNN` (the result is a :class:`DNNResult` whose
    ``active_per_layer`` is summed over devices) or any function ``[rows, ...] -> [rows,
    ...]`` built from the library's ops (weights it closes over are replicated).
    ``x`` may be a host array or an array already sharded by rows (``NamedSharding``
    with ``P(axis)``), which is used as it is.
    """
    axis = axis or mesh.axis_names[0]
    size = mesh.shape[axis]
    spec = P(axis)
    if isinstance(fn, SparseDNN):
        net = fn

        def body(x):
            r = net(x)
            return r.features, r.alive, lax.psum(r.active_per_layer, axis)

        mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(spec, spec, P()))

        @jax.jit
        def run_net(x):
            x, pad = _pad_rows(x, size)
            y, alive, active = mapped(x)
            n = x.shape[0] - pad
            return DNNResult(y[:n], alive[:n], active)

        return _with_input_sharding(run_net, mesh, spec)

    mapped = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)

    @jax.jit
    def run(x):
        x, pad = _pad_rows(x, size)
        y = mapped(x)
        return y[: x.shape[0] - pad]

    return _with_input_sharding(run, mesh, spec)


def _with_input_sharding(run, mesh, spec):
    """Places host inputs row-split over the mesh; arrays already laid out that way, or
    global arrays spanning several processes, go in as they are."""
    sharding = NamedSharding(mesh, spec)
    size = mesh.shape[spec[0]]

    def call(x):
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.sharding == sharding):
            return run(x)
        x = jnp.asarray(x)
        if x.shape[0] % size == 0:
            x = jax.device_put(x, sharding)
        return run(x)

    call.lower = run.lower  # for inspecting the compiled program
    return call
