"""``lrpc serve``: a real Triton server (PyTriton) answering KServe v2 clients over HTTP and gRPC.

The server runs from its own environment (PyTriton pins numpy<2; ``make test`` builds
``.venv-serve`` and passes its interpreter in ``LRPC_SERVE_PYTHON``); the clients here are
``tritonclient``'s, unchanged. Every answer is checked against onnxruntime on the same
compiled file. Servers listen on 127.0.0.1 with ports the OS picks and are stopped by their
own PID.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import lrpc
from lrpc.runtime.session import make_session
from support.sockets import LOOPBACK, listening

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
SAMPLES = np.load(DIGITS / "samples.npy").astype(np.float32)


def serve_python() -> str:
    python = os.environ.get("LRPC_SERVE_PYTHON")
    assert python and Path(python).exists(), (
        "LRPC_SERVE_PYTHON must name the interpreter of the serve environment (make test builds .venv-serve)")
    return python


def descendants(pid: int) -> set[int]:
    found, stack = set(), [pid]
    while stack:
        try:
            children = Path(f"/proc/{stack.pop()}/task").glob("*/children")
            kids = [int(k) for f in children for k in f.read_text().split()]
        except OSError:
            continue
        found.update(kids)
        stack.extend(kids)
    return found




class Server:
    def __init__(self, model: Path, folder: Path):
        self.ready = folder / "ready.json"
        self.log = open(folder / "server.log", "w")
        # a short path: PyTriton's unix sockets live in its workspace (at most 107 characters)
        self.home = Path(tempfile.mkdtemp(prefix="lrpc-test-", dir="/tmp"))
        env = {**os.environ, "PYTRITON_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            [serve_python(), "-m", "lrpc.cli", "serve", str(model), "--http-port", "0", "--grpc-port", "0",
             "--metrics-port", "0", "--ready-file", str(self.ready), "--max-batch-size", "32",
             "--queue-delay-us", "20000", "--threads", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while not self.ready.exists():
            assert self.proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not get ready in 90 s"
            time.sleep(0.2)
        self.ports = json.loads(self.ready.read_text())
        self.clients: list = []
        self.children = descendants(self.proc.pid)

    def http(self):
        self.clients.append(httpclient.InferenceServerClient(f"127.0.0.1:{self.ports['http']}"))
        return self.clients[-1]

    def grpc(self):
        self.clients.append(grpcclient.InferenceServerClient(f"127.0.0.1:{self.ports['grpc']}"))
        return self.clients[-1]

    def stop(self, signum=signal.SIGTERM) -> tuple[int, float]:
        for client in self.clients:  # Triton waits for open HTTP connections before it exits
            client.close()
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        return code, time.monotonic() - start

    def cleanup(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "digits.lrp.onnx"
    return lrpc.compile_file(DIGITS / "digits_cnn.onnx", path, labels=True)


@pytest.fixture(scope="module")
def server(compiled, tmp_path_factory):
    running = Server(compiled, tmp_path_factory.mktemp("serve"))
    yield running
    code, seconds = running.stop()
    running.cleanup()
    # within Triton's exit timeout (30 s): its Python backend sometimes takes that long to unload
    assert code == 0 and seconds < 45, f"exit {code} after {seconds:.1f} s"


_LOCAL: dict = {}


def expected(compiled: Path, x: np.ndarray, target: np.ndarray) -> dict:
    """What a local ``lrpc.LRP`` on the same file answers (and the file's other outputs, from
    a session with the options lrpc uses: unpacked weights round differently, by 4e-9 here)."""
    if compiled not in _LOCAL:
        _LOCAL[compiled] = (lrpc.LRP(compiled), make_session(compiled, providers=["cpu"]))
    analyzer, session = _LOCAL[compiled]
    explanation = analyzer.analyze(x, target)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x, "lrp_target": target})))
    np.testing.assert_array_equal(outputs["relevance"], explanation.val)
    return outputs


def request(module, x: np.ndarray, target: np.ndarray | None, target_dtype: str = "INT64"):
    inputs = [module.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if target is not None:
        inputs.append(module.InferInput("lrp_target", list(target.shape), target_dtype))
        inputs[-1].set_data_from_numpy(target)
    return inputs


def extra_input(module, name: str, value: np.ndarray):
    tensor = module.InferInput(name, list(value.shape), {"float32": "FP32", "float64": "FP64", "int64": "INT64"}[
        value.dtype.name])
    tensor.set_data_from_numpy(value)
    return tensor


def test_the_model_as_clients_see_it(server):
    meta = server.http().get_model_metadata("lrpc")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("input", "FP32", [-1, 1, 8, 8]), ("lrp_target", "INT64", [-1, 1])]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "relevance", "lrp_class", "lrp_logit"}
    assert server.grpc().is_model_ready("lrpc")
    # only this machine can reach it
    ports = {server.ports[k] for k in ("http", "grpc", "metrics")}
    found = listening(ports)
    assert len(found) >= 3 and set(found) <= LOOPBACK, found


def test_concurrent_http_and_grpc_clients_with_mixed_targets_get_their_own_answers(server, compiled):
    """8 clients at once, half per protocol; each request has 1-4 rows and either no target,
    -1s, or chosen classes. Triton merges them into batches; every row must still be
    explained for its own target."""
    failures, done = [], []

    def client(worker: int):
        rng = random.Random(worker)
        module = httpclient if worker % 2 else grpcclient
        conn = server.http() if worker % 2 else server.grpc()
        for _ in range(12):
            n = rng.randint(1, 4)
            rows = np.array(rng.sample(range(len(SAMPLES)), n))
            x = SAMPLES[rows]
            kind = rng.choice(["none", "argmax", "chosen"])
            target = None if kind == "none" else (
                np.full((n, 1), -1, np.int64) if kind == "argmax" else np.array([[rng.randrange(10)] for _ in range(n)]))
            try:
                got = conn.infer("lrpc", request(module, x, target))
                want = expected(compiled, x, np.full(n, -1, np.int64) if target is None else target.reshape(-1))
                for name, value in want.items():  # one value per row comes as [N, 1]
                    np.testing.assert_allclose(got.as_numpy(name).reshape(value.shape), value, rtol=1e-5, atol=1e-6, err_msg=name)
                done.append(n)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"worker {worker} ({kind}, {n} rows): {exc}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(done) == 8 * 12
    # Triton did merge requests: fewer executions than requests
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=10).read().decode()
    count = {k: sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(k + "{"))
             for k in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success")}
    assert count["nv_inference_exec_count"] < count["nv_inference_request_success"], count


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_malformed_requests_get_one_line_errors(server, module):
    conn = server.http() if module is httpclient else server.grpc()
    x = SAMPLES[:2]
    bad = {
        "target out of range": (request(module, x, np.array([[3], [10]], np.int64)), "out of range"),
        "target below -1": (request(module, x, np.array([[-2], [1]], np.int64)), "out of range"),
        "target as INT32": (request(module, x, np.array([[1], [2]], np.int32), "INT32"), "INT32"),
        "target of another batch": (request(module, x, np.array([[1], [2], [3]], np.int64)), "batch"),
        "wrong shape": (request(module, x.reshape(2, 1, 4, 16), None), "shape"),
        "wrong dtype": ([extra_input(module, "input", x.astype(np.float64))], "FP64"),
        "unknown input": (request(module, x, None) + [extra_input(module, "pixels", x)], "pixels"),
        "no image": ([extra_input(module, "lrp_target", np.array([[1], [2]], np.int64))], "missing input"),
    }
    for label, (inputs, needle) in bad.items():
        with pytest.raises(InferenceServerException) as caught:
            conn.infer("lrpc", inputs)
        message = caught.value.message()
        assert needle in message, f"{label}: {message}"
        assert "Traceback" not in message and "\n" not in message.strip(), f"{label}: {message}"
        assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), label
    # the server still answers
    np.testing.assert_allclose(conn.infer("lrpc", request(module, x, None)).as_numpy("relevance").sum((1, 2, 3)),
                               [1.0, 1.0], atol=0.3)


def test_one_bad_request_does_not_fail_the_requests_batched_with_it(server, compiled):
    """7 good requests and one with an out-of-range target arrive together and share a
    batch: the bad one gets its own 400, the others their results."""
    barrier, results = threading.Barrier(8), {}

    def client(i: int):
        conn = server.http()
        target = np.array([[99]], np.int64) if i == 3 else np.array([[i]], np.int64)
        barrier.wait()
        try:
            results[i] = conn.infer("lrpc", request(httpclient, SAMPLES[i:i + 1], target)).as_numpy("relevance")
        except InferenceServerException as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results[3], InferenceServerException) and results[3].status() == "400"
    for i in set(range(8)) - {3}:
        want = expected(compiled, SAMPLES[i:i + 1], np.array([i], np.int64))["relevance"]
        np.testing.assert_allclose(results[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_and_everything_it_started(compiled, tmp_path, signum):
    running = Server(compiled, tmp_path)
    assert running.grpc().is_server_live()
    children, ports = running.children, {running.ports[k] for k in ("http", "grpc", "metrics")}
    assert children, "tritonserver should run as a child"
    code, seconds = running.stop(signum)
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert seconds < 45
    deadline = time.monotonic() + 15
    while (descendants_alive := [p for p in children if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not descendants_alive
    assert not listening(ports)
    assert not list(running.home.glob("workspace_*"))
    running.cleanup()


def test_serving_a_model_that_is_not_compiled_is_refused(tmp_path):
    done = subprocess.run([serve_python(), "-m", "lrpc.cli", "serve", str(DIGITS / "digits_cnn.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lrpc: error: {DIGITS / 'digits_cnn.onnx'}: not a compiled file; run lrpc compile first"]


def test_a_gradient_method_file_is_served_like_any_compiled_file(tmp_path):
    """An IntegratedGradients file (its steps batched inside the graph) behind the server:
    each row of a merged batch gets its own attribution, as a local session computes it."""
    path = lrpc.compile_file(DIGITS / "digits_cnn.onnx", tmp_path / "ig.onnx",
                             method="IntegratedGradients(steps=8)")
    running = Server(path, tmp_path)
    try:
        client = running.http()
        meta = client.get_model_metadata("lrpc")
        assert {o["name"] for o in meta["outputs"]} == {"probabilities", "attribution"}
        x, target = SAMPLES[:3], np.array([[1], [-1], [7]], np.int64)
        result = client.infer("lrpc", request(httpclient, x, target))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        local = dict(zip([o.name for o in session.get_outputs()],
                         session.run(None, {"input": x, "lrp_target": target.reshape(-1)})))
        np.testing.assert_allclose(result.as_numpy("attribution"), local["attribution"], rtol=1e-5,
                                   atol=1e-6 * np.abs(local["attribution"]).max())
    finally:
        code, _ = running.stop()
        running.cleanup()
    assert code == 0
