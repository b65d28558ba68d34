"""``lrpc explain-dataset`` on a local Dask cluster of two worker processes, loopback only."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import lrpc
from lrpc.dataset import local_cluster, read_dataset
from support.sockets import LOOPBACK, listening

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    x = np.load(DIGITS / "samples.npy")
    batch = np.concatenate([x, x + rng.normal(0, 0.5, x.shape).astype(np.float32), x[::-1] * 0.5])  # 24 samples
    path = tmp_path_factory.mktemp("data") / "many.npy"
    np.save(path, batch)
    return path


def test_shards_on_two_workers_equal_one_local_call(many, tmp_path):
    result = lrpc.explain_dataset(DIGITS / "digits_cnn.onnx", [many], tmp_path / "out", lrpc.EpsilonPlus(), workers=2,
                             shard_size=5, batch_size=2, progress=False)
    assert (result.samples, result.shards) == (24, 5)
    got = read_dataset(tmp_path / "out")
    want = lrpc.LRP(DIGITS / "digits_cnn.onnx", lrpc.EpsilonPlus()).analyze(np.load(many))
    np.testing.assert_allclose(got["relevance"], want.val, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["target"], want.output_selection)
    np.testing.assert_allclose(got["output"], want.output, atol=1e-6)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    assert len(index["inputs"]) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_the_local_cluster_listens_on_the_loopback_only():
    from distributed import Client

    with local_cluster(2) as cluster, Client(cluster) as client:
        workers = list(client.run(os.getpid).values())
        nannies = [w.process.pid for w in cluster.workers.values()]
        assert len(workers) == 2
        found = listening(pids=[os.getpid(), *workers, *nannies])
    # the scheduler (in this process), two workers and their nannies
    assert len(found) >= 5, found
    assert set(found) <= LOOPBACK, found


def test_command_line(many, tmp_path, cli):
    done = cli("explain-dataset", DIGITS / "digits_cnn.onnx", many, "-o", tmp_path / "out", "--shard-size", "10",
               "--workers", "2", "--composite", "EpsilonPlus")
    assert done.code == 0, done.err
    assert done.out.splitlines()[-1].startswith("explained 24 sample(s) in 3 shard(s)")
    assert read_dataset(tmp_path / "out")["relevance"].shape == (24, 1, 8, 8)
    bad = cli("explain-dataset", DIGITS / "digits_cnn.onnx", many, "-o", tmp_path / "x", "--shard-size", "0")
    assert bad.code == 2 and len(bad.err_lines) == 1


def test_a_file_of_several_targets_gives_k_rows_per_sample(many, tmp_path):
    compiled = lrpc.compile_file(DIGITS / "digits_cnn.onnx", tmp_path / "k.lrp.onnx", lrpc.EpsilonPlus(), targets=3)
    lrpc.explain_dataset(compiled, [many], tmp_path / "out", workers=2, shard_size=7, batch_size=4, progress=False)
    got = read_dataset(tmp_path / "out")
    want = lrpc.LRP(compiled).analyze(np.load(many))
    n = len(np.load(many))
    assert got["relevance"].shape == (n, 3, 1, 8, 8) and got["target"].shape == (n, 3)
    np.testing.assert_allclose(got["relevance"], want.val.reshape(3, n, 1, 8, 8).swapaxes(0, 1), atol=1e-6)
    np.testing.assert_array_equal(got["target"], want.output_selection.reshape(3, n).T)
