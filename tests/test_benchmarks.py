"""Smoke runs of the benchmark and tuning scripts at tiny sizes, on whatever device JAX has
(CPU in CI): their arguments parse, every method runs and agrees with the others, and the
JSON they write has the documented rows."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_bench_linear(tmp_path, capsys):
    import bench_linear

    out = tmp_path / "linear.json"
    bench_linear.main(
        ["--neurons", "64", "--batch", "16", "--patterns", "random", "radixnet", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["pattern"] for r in rows} == {"random", "radixnet"}
    assert all(r["ms"] > 0 and r["TE/s"] > 0 for r in rows)
    exact = ("jax_spdnn", "scipy", "cuSPARSE")  # float32 sums (dense peers round: bf16, TF32)
    diffs = [
        r["max_abs_diff"]
        for r in rows
        if r.get("max_abs_diff") is not None and any(k in r["method"] for k in exact)
    ]
    assert diffs and max(diffs) < 1e-4
    assert "| 64 | random | 16 |" in capsys.readouterr().out


def test_bench_dnn(tmp_path):
    import bench_dnn

    out = tmp_path / "dnn.json"
    bench_dnn.main(["--problems", "1024-4", "--batch", "300", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["method"].startswith("jax_spdnn")]
    assert ours and all(r["check"].startswith("PASSED") for r in ours)
    assert all(r["survivors"] > 0 for r in ours)


def test_bench_dnn_streams_large_networks(tmp_path, monkeypatch):
    """By default a network above STREAM_NNZ nonzeros is streamed (and checked by the
    streamed reference); smaller ones run as SparseDNN; --chunk-layers 0 forces SparseDNN."""
    import bench_dnn

    monkeypatch.setattr(bench_dnn, "STREAM_NNZ", 64 * 32 * 5)
    out = tmp_path / "dnn.json"
    bench_dnn.main(
        ["--problems", "64-4", "64-6", "--batch", "200", "--stream-trials", "1", "--json", str(out)]
    )
    ours = [r for r in json.loads(out.read_text())["rows"] if r["method"].startswith("jax_spdnn")]
    rows = {r["problem"]: r for r in ours}  # (peers run on a GPU, for SparseDNN's rows)
    assert "SparseDNN" in rows["64-4"]["method"] and "first_call_s" in rows["64-4"]
    assert "stream_network" in rows["64-6"]["method"]
    assert all(r["check"].startswith("PASSED") for r in rows.values())
    argv = ["--problems", "64-6", "--batch", "200", "--chunk-layers", "0", "--no-peers"]
    bench_dnn.main(argv + ["--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert "SparseDNN" in row["method"]


def test_tuning_and_profile_scripts(monkeypatch, capsys):
    import profile_linear
    import tune_stationary

    for var in ("SPDNN_LINEAR_KERNEL", "SPDNN_STAT_ROWS", "SPDNN_STAT_THREADS"):
        monkeypatch.setenv(var, "")  # recorded: restored (unset) after the test
        monkeypatch.delenv(var)
    tune_stationary.main(
        ["--neurons", "64", "--batch", "16", "--rows", "3", "--threads", "512", "--iters", "1"]
    )
    table = capsys.readouterr().out
    assert table.count("| 64 | random |") == 2  # scheduled and CSR order
    monkeypatch.setattr(sys, "argv", ["profile_linear.py", "--neurons", "64", "--batch", "16"])
    profile_linear.main()
    assert "bfloat16 run 1" in capsys.readouterr().out


def test_profile_dnn_tails(monkeypatch, capsys):
    """The whole-network A/B of stationary-tail settings: every setting, called directly
    and through an outer jit, gives the first setting's features and active counts; the
    dispatch probe times the host's enqueue; settings combine with kernel options."""
    import profile_dnn

    for k in ("SPDNN_FP_TAIL", "SPDNN_STAT_TALL", "SPDNN_STAT_DIRECT"):
        monkeypatch.delenv(k, raising=False)
    argv = ["profile_dnn.py", "--problem", "64-6", "--batch", "100", "--calls", "2"]
    tails = ["default", "off", "0,2", "0,2+tall=off+direct=0"]
    monkeypatch.setattr(sys, "argv", argv + ["--rounds", "1", "--dispatch", "--tails", *tails])
    profile_dnn.main()
    out = capsys.readouterr().out.splitlines()
    lines = [x for x in out if "ms per call; survivors" in x]
    assert len(lines) == 4 and all("same as default: True" in x for x in lines)
    assert all("direct" in x and "jit" in x and "enqueued" in x for x in lines)
    assert sum(x.startswith("dispatch") and "enqueued in" in x for x in out) == 7
    assert "SPDNN_FP_TAIL" not in os.environ and "SPDNN_STAT_TALL" not in os.environ
    assert profile_dnn.setting_env("2,4+tall=0") == {
        "SPDNN_FP_TAIL": "2,4",
        "SPDNN_STAT_TALL": "0",
    }
    with pytest.raises(SystemExit, match="unknown setting"):
        profile_dnn.setting_env("rows=3")


def test_profile_stream(monkeypatch, capsys):
    """The streamed-call host profile runs and reports a time and its top functions."""
    import profile_stream

    argv = ["profile_stream.py", "--problem", "64-6", "--chunk-layers", "3", "--batch", "50"]
    monkeypatch.setattr(sys, "argv", argv + ["--top", "5"])
    profile_stream.main()
    out = capsys.readouterr().out
    assert "64-6:" in out and "s per call" in out and "stream_network" in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


@pytest.mark.parametrize("chunk", ["0", "2"])  # SparseDNN; a streamed network
def test_ab_env(monkeypatch, capsys, chunk):
    import ab_env

    monkeypatch.delenv("SPDNN_FP_RUN_TILES", raising=False)
    ab_env.main(
        ["--problem", "256-4", "--batch", "40", "--chunk-layers", chunk, "--var",
         "SPDNN_FP_RUN_TILES", "--values", "8", "unset", "--rounds", "1", "--calls", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "256-4 SPDNN_FP_RUN_TILES=8: best" in out
    assert "256-4 SPDNN_FP_RUN_TILES=unset: best" in out
    assert "SPDNN_FP_RUN_TILES" not in os.environ  # 'unset' unset it
