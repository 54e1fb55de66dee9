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


def _route(y, ids, dest, slot, axis: str, size: int):
    """Sends row k of ``y``/``ids`` to device ``dest[k]``, position ``slot[k]`` (rows with
    ``dest == size`` stay behind) with one ``all_to_all``; returns the received rows, zeros
    and id -1 where nothing arrived."""
    b = y.shape[0]
    send = jnp.zeros((size, b) + y.shape[1:], y.dtype).at[dest, slot].set(y, mode="drop")
    send_ids = jnp.full((size, b), -1, jnp.int32).at[dest, slot].set(ids, mode="drop")
    recv = lax.all_to_all(send, axis, 0, 0)
    recv_ids = lax.all_to_all(send_ids, axis, 0, 0)
    got = recv_ids >= 0  # each position is filled by at most one source: the sum is exact
    return jnp.sum(jnp.where(got[..., None], recv, 0), axis=0), jnp.max(recv_ids, axis=0)


def _rebalance(y, alive, ids, axis: str, size: int):
    """Spreads the alive rows evenly over the devices (in global order); dead rows vanish."""
    b = y.shape[0]
    order = jnp.argsort(~alive, stable=True)  # alive rows first, in order
    y, ids, alive = y[order], ids[order], alive[order]
    count = jnp.sum(alive).astype(jnp.int32)
    counts = lax.all_gather(count, axis)
    first = jnp.sum(jnp.where(jnp.arange(size) < lax.axis_index(axis), counts, 0))
    cap = jnp.maximum((jnp.sum(counts) + size - 1) // size, 1)
    rank = first + jnp.arange(b, dtype=jnp.int32)
    dest = jnp.where(jnp.arange(b) < count, rank // cap, size)
    return _route(y, ids, dest, rank % cap, axis, size)


def _balanced_network(net: SparseDNN, every: int, axis: str, size: int):
    if not net.can_drop_dead_rows():
        raise ValueError("rebalancing needs a network whose dead rows stay dead (biases <= 0)")
    cuts = list(range(0, net.n_layers, every)) + [net.n_layers]
    parts = [
        SparseDNN(net.layers[a:b], net.biases[a:b], clip=net.clip) for a, b in zip(cuts, cuts[1:])
    ]

    def body(x):
        b = x.shape[0]
        home = (lax.axis_index(axis) * b + jnp.arange(b)).astype(jnp.int32)
        ids, actives = home, []
        for k, part in enumerate(parts):
            r = part(x)
            actives.append(lax.psum(r.active_per_layer, axis))
            x = r.features
            if k + 1 < len(parts):
                x, ids = _rebalance(x, r.alive, ids, axis, size)
        # Send every surviving row back to its home device and position.
        keep = ids >= 0
        dest = jnp.where(keep, ids // b, size)
        y, _ = _route(x, ids, dest, jnp.where(keep, ids % b, 0), axis, size)
        return y, jnp.any(y != 0, axis=1), jnp.concatenate(actives)

    return body


def shard(
    fn: Callable | SparseDNN,
    mesh: Mesh,
    *,
    axis: str | None = None,
    rebalance_every: int | None = None,
) -> Callable:
    """Runs ``fn(x)`` with the rows of ``x`` split over ``mesh``'s ``axis``, jitted.

    ``fn`` is a :class:`SparseDNN` (the result is a :class:`DNNResult` whose
    ``active_per_layer`` is summed over devices) or any function ``[rows, ...] -> [rows,
    ...]`` built from the library's ops (weights it closes over are replicated).
    ``x`` may be a host array or an array already sharded by rows (``NamedSharding``
    with ``P(axis)``), which is used as it is.

    ``rebalance_every=k`` (networks only; off by default) moves the surviving rows every
    ``k`` layers so each device holds an equal share (``all_gather`` of the counts and one
    ``all_to_all`` of the rows; the rows go home at the end).  Results are identical.
    """
    axis = axis or mesh.axis_names[0]
    size = mesh.shape[axis]
    spec = P(axis)
    if isinstance(fn, SparseDNN):
        net = fn
        if rebalance_every:
            body = _balanced_network(net, int(rebalance_every), axis, size)
        else:

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

        call = _with_input_sharding(run_net, mesh, spec)
        if net.can_drop_dead_rows():
            return call  # zero padding rows stay dead: nothing to discount

        def call_counted(x):
            # A positive bias wakes the zero padding rows; they all share one zero row's
            # fate, so follow one and discount them from the active counts.
            r = call(x)
            pad = (-x.shape[0]) % size
            if not pad:
                return r
            probe = net(jnp.zeros((1, x.shape[1]), r.features.dtype)).active_per_layer
            probe = jax.device_put(probe, r.active_per_layer.sharding)
            return DNNResult(r.features, r.alive, r.active_per_layer - pad * probe)

        call_counted.lower = call.lower
        return call_counted

    if rebalance_every:
        raise ValueError("rebalance_every applies to SparseDNN networks only")
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
