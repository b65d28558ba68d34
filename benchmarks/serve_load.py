"""Load test of ``lrpc serve``: throughput and latency under concurrent clients.

Starts ``lrpc serve`` (from the serve environment, ``.venv-serve``) on the compiled
MobileNetV2 of ``benchmarks/models.py`` (224x224, EpsilonPlusFlat) on 127.0.0.1, then for
each client count sends one-image requests over HTTP for a fixed time, every request with
``lrp_target`` (-1 or a class, so that Triton can merge them), and records per-request
latency. The baseline is the same compiled file in an in-process onnxruntime session, one
image per call: what a client would get without the server. The server is stopped by its
PID at the end; everything is bounded (``--seconds`` per client count).

    python benchmarks/serve_load.py                       # prints a table
    python benchmarks/serve_load.py --output BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-serve-bench:begin -->", "<!-- lrpc-serve-bench:end -->"


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def start_server(model: Path, python: str, threads: int, max_batch: int, delay_us: int, folder: Path):
    ready = folder / "ready.json"
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([python, "-m", "lrpc.cli", "serve", str(model), "--http-port", "0", "--grpc-port", "0",
                             "--metrics-port", "0", "--ready-file", str(ready), "--threads", str(threads),
                             "--max-batch-size", str(max_batch), "--queue-delay-us", str(delay_us)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTRITON_HOME": str(folder)})
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start; see {folder / 'server.log'}")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text()), log


def metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_count")
    return {n: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(n + "{")) for n in names}


def load(port: int, clients: int, seconds: float, images: np.ndarray) -> dict:
    import tritonclient.http as httpclient

    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    def client(worker: int):
        conn = httpclient.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=60, network_timeout=120)
        rng = np.random.default_rng(worker)
        try:
            while time.monotonic() < stop_at:
                x = images[rng.integers(len(images))][None]
                inputs = [httpclient.InferInput("input", list(x.shape), "FP32"),
                          httpclient.InferInput("lrp_target", [1, 1], "INT64")]
                inputs[0].set_data_from_numpy(x)
                inputs[1].set_data_from_numpy(np.array([[int(rng.integers(-1, 1000))]], dtype=np.int64))
                start = time.perf_counter()
                try:
                    conn.infer("lrpc", inputs)
                    latencies.append(time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - counted, not fatal for the run
                    errors.append(str(exc)[:200])
        finally:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": elapsed,
            "throughput": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p95_ms": percentile(latencies, 95) * 1e3}


def baseline(model: Path, threads: int, images: np.ndarray, seconds: float) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    latencies, stop_at = [], time.monotonic() + seconds
    session.run(None, {"input": images[:1]})
    while time.monotonic() < stop_at:
        start = time.perf_counter()
        session.run(None, {"input": images[:1]})
        latencies.append(time.perf_counter() - start)
    return {"throughput": len(latencies) / sum(latencies), "p50_ms": percentile(latencies, 50) * 1e3,
            "p95_ms": percentile(latencies, 95) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per client count")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=5000)
    parser.add_argument("--serve-python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    parser.add_argument("--output", help="rewrite the serve section of this markdown file")
    args = parser.parse_args(argv)

    import models
    import run

    import lrpc

    cache = ROOT / ".bench"
    compiled = cache / "compiled" / "mobilenet_v2.serve.lrp.onnx"
    if not compiled.exists():
        lrpc.compile_file(models.onnx_path("mobilenet_v2", str(cache / "models")), compiled, lrpc.EpsilonPlusFlat())
    images = models.example_input(32, seed=1)
    base = baseline(compiled, args.threads, images, args.seconds)
    print(f"in-process onnxruntime, one image per call: {base['throughput']:.1f}/s, p50 {base['p50_ms']:.0f} ms")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrpc-load-", dir="/tmp") as folder:
        proc, ports, log = start_server(compiled, args.serve_python, args.threads, args.max_batch_size,
                                        args.queue_delay_us, Path(folder))
        try:
            for clients in args.clients:
                before = metrics(ports["metrics"])
                row = load(ports["http"], clients, args.seconds, images)
                after = metrics(ports["metrics"])
                executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                row["rows_per_run"] = (after["nv_inference_count"] - before["nv_inference_count"]) / max(executions, 1)
                rows.append(row)
                print(f"{clients:3d} clients: {row['throughput']:.1f} explanations/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p95 {row['p95_ms']:.0f} ms, {row['rows_per_run']:.1f} images per session run, "
                      f"{row['errors']} errors")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=90)
            log.close()
    print(f"server stopped, exit {code}")
    if args.output:
        info = run.machine_info(args.threads)
        lines = [*run.section_head("Serving (`lrpc serve`)", info),
                 "- Server: PyTriton 0.7.0 (Triton 2.51), onnxruntime CPU, "
                 f"{args.threads} intra-op threads; clients: tritonclient HTTP on the same machine",
                 f"- Command: `python benchmarks/serve_load.py --output BENCHMARKS.md` ({args.seconds:.0f} s per "
                 f"client count; max batch {args.max_batch_size}, queue delay {args.queue_delay_us} us)",
                 "- Model: MobileNetV2 224x224 (`benchmarks/models.py`), EpsilonPlusFlat; one image per request, "
                 "each with `lrp_target` (-1 or a random class)", "",
                 "| clients | explanations/s | p50 ms | p95 ms | images per session run | errors | vs in-process |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                 f"| in-process, 1 image per call | {base['throughput']:.1f} | {base['p50_ms']:.0f} | "
                 f"{base['p95_ms']:.0f} | 1 | 0 | 1.00x |"]
        for row in rows:
            lines.append(f"| {row['clients']} | {row['throughput']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                         f"{row['rows_per_run']:.1f} | {row['errors']} | {row['throughput'] / base['throughput']:.2f}x |")
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
