"""jax_spdnn.distributed: sharded networks and layers equal single-device results (uneven
batches, a device left with no active rows, inputs already sharded), pmap works, and a
two-process CPU runtime reproduces the single-process categories."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_spdnn as sd
from jax_spdnn import distributed as dist
from jax_spdnn.challenge import radixnet, random_inputs


@pytest.fixture(autouse=True)
def _on_the_cpu():
    """The meshes here are CPU devices: the single-device references run there too (on a
    GPU machine the default device would be the GPU, whose hybrid network path sums in
    another order)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (jax_num_cpu_devices)")
    return dist.batch_mesh(devices[:4])


@pytest.fixture(scope="module")
def net():
    return sd.SparseDNN(radixnet(256, 10, seed=3), -0.3)


@pytest.mark.parametrize("batch", [400, 401, 3])
def test_sharded_network_equals_single_device(mesh, net, batch):
    x = random_inputs(256, batch, seed=2)
    r = dist.shard(net, mesh)(x)
    ref = net(x)
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(ref.features))
    np.testing.assert_array_equal(np.asarray(r.alive), np.asarray(ref.alive))
    np.testing.assert_array_equal(np.asarray(r.active_per_layer), np.asarray(ref.active_per_layer))


@pytest.mark.parametrize("batch", [37, 40])
def test_positive_bias_padding_not_counted(mesh, batch):
    """A positive bias wakes zero rows, including the zero rows that pad an uneven batch:
    the active counts still equal the single-device ones."""
    net = sd.SparseDNN(radixnet(64, 5, seed=5), 0.05)
    x = random_inputs(64, batch, seed=3)
    r = dist.shard(net, mesh)(x)
    ref = net(x)
    np.testing.assert_array_equal(np.asarray(r.active_per_layer), np.asarray(ref.active_per_layer))
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(ref.features))


def test_device_with_no_active_rows(mesh, net):
    x = random_inputs(256, 400, seed=4)
    x[300:] = 0.0  # the last device's rows are all zero from the start
    r = dist.shard(net, mesh)(x)
    assert not np.asarray(r.alive)[300:].any()
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(net(x).features))


def test_sharded_layers_and_no_all_gather(mesh):
    layers = radixnet(256, 3, seed=1)
    x = jax.device_put(random_inputs(256, 64, seed=0), NamedSharding(mesh, P("batch")))

    def f(h):
        for W in layers:
            h = sd.sparse_linear(h, W, -0.3, clip=32.0)
        return h

    g = dist.shard(f, mesh)
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(f(x)))
    hlo = g.lower(x).compile().as_text()
    assert "all-gather" not in hlo


def test_pmap(mesh, net):
    devices = jax.devices("cpu")[:4]
    W = net.layers[0]
    x = random_inputs(256, 40, seed=1)
    y = jax.pmap(lambda h: sd.sparse_linear(h, W, -0.3, clip=32.0), devices=devices)(
        x.reshape(4, 10, 256)
    )
    np.testing.assert_array_equal(
        np.asarray(y).reshape(40, 256), np.asarray(sd.sparse_linear(x, W, -0.3, clip=32.0))
    )
    r = jax.pmap(lambda h: net(h).features, devices=devices)(x.reshape(4, 10, 256))
    np.testing.assert_array_equal(np.asarray(r).reshape(40, 256), np.asarray(net(x).features))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process():
    worker = Path(__file__).with_name("multiprocess_worker.py")
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(i), "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    net = sd.SparseDNN(radixnet(256, 12, seed=3), -0.3)
    ref = net(random_inputs(256, 400, seed=2))
    want = ",".join(map(str, np.flatnonzero(np.asarray(ref.alive))))
    want_active = ",".join(map(str, np.asarray(ref.active_per_layer)))
    for out, _ in outs:
        lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)
        assert lines["CATEGORIES"] == want
        assert lines["ACTIVE"] == want_active


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("batch", [400, 397])
def test_rebalancing_gives_identical_results(mesh, net, every, batch):
    """Rows die unevenly (the first devices start with zero rows); rebalancing moves the
    survivors around and home again without changing a bit."""
    x = random_inputs(256, batch, seed=6)
    x[:180] = 0.0
    ref = net(x)
    r = dist.shard(net, mesh, rebalance_every=every)(x)
    np.testing.assert_array_equal(np.asarray(r.features), np.asarray(ref.features))
    np.testing.assert_array_equal(np.asarray(r.alive), np.asarray(ref.alive))
    np.testing.assert_array_equal(np.asarray(r.active_per_layer), np.asarray(ref.active_per_layer))


def test_rebalancing_when_everything_dies(mesh):
    net = sd.SparseDNN(radixnet(64, 6, seed=1), -50.0)
    r = dist.shard(net, mesh, rebalance_every=2)(random_inputs(64, 40, seed=0))
    assert not np.asarray(r.alive).any() and not np.asarray(r.active_per_layer).any()


def test_rebalancing_errors(mesh, net):
    with pytest.raises(ValueError, match="biases <= 0"):
        dist.shard(sd.SparseDNN(net.layers, 0.1), mesh, rebalance_every=2)
    with pytest.raises(ValueError, match="SparseDNN networks only"):
        dist.shard(lambda h: h, mesh, rebalance_every=2)


@pytest.mark.parametrize("rebalance", [0, 3])
def test_cli_distributed_two_processes(tmp_path, rebalance):
    """The documented launcher: two processes of `python -m jax_spdnn --distributed` on one
    machine (two CPU devices each) report the single-process survivors and pass the check."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "launch_local.sh"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "2",
        "SPDNN_PORT": str(_free_port()),
    }
    args = ["--neurons", "1024", "--layers", "10", "--batch", "603", "--rebalance", str(rebalance)]
    out = subprocess.run(
        ["bash", str(script), "2", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    flat = " ".join(out.stdout.split())
    assert "distributed: 2 processes, 4 devices" in flat
    single = subprocess.run(
        [sys.executable, "-m", "jax_spdnn", *args[:-2], "--no-check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    survivors = [line for line in single.stdout.splitlines() if "nonzero final row" in line]
    assert survivors and survivors[0] in out.stdout
    assert "PASSED" in flat
