"""One process of the multi-process test: joins a 2-process CPU runtime, loads its half of
the inputs, runs the sharded challenge inference and prints the global categories."""

import sys

import jax
import numpy as np

import jax_spdnn as sd
from jax_spdnn import distributed as dist
from jax_spdnn.challenge import radixnet, random_inputs


def main(port: int, pid: int, nproc: int) -> None:
    dist.initialize(f"127.0.0.1:{port}", nproc, pid)
    mesh = dist.batch_mesh()  # every device of every process
    net = sd.SparseDNN(radixnet(256, 12, seed=3), -0.3)
    x = random_inputs(256, 400, seed=2)  # every process builds the same inputs ...
    rows = np.array_split(np.arange(400), nproc)[pid]  # ... and contributes its own rows
    xg = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")), x[rows]
    )
    r = dist.shard(net, mesh)(xg)
    from jax.experimental import multihost_utils

    alive = multihost_utils.process_allgather(r.alive, tiled=True)
    active = np.asarray(r.active_per_layer)
    print("CATEGORIES", ",".join(map(str, np.flatnonzero(alive))), flush=True)
    print("ACTIVE", ",".join(map(str, active)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
