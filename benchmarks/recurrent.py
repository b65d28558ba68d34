"""Recurrent layers: what writing an LSTM out in its time steps costs, by sequence length.

A bidirectional two-layer ``nn.LSTM`` (64 inputs, 128 hidden units, batch 8) with a linear
head on the last step, exported by torch (legacy exporter, ONNX ``LSTM`` ops), compiled with
EpsilonPlusFlat for T = 16, 64 and 256 steps. Measured: the compile time, the compiled file's
size against the export's, plain onnxruntime inference of the export and the compiled file's
explanation (median of N), each in this process.

    python benchmarks/recurrent.py [--repeats 5] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-recurrent-bench:begin -->", "<!-- lrpc-recurrent-bench:end -->"
LENGTHS = (16, 64, 256)
BATCH, FEATURES, HIDDEN = 8, 64, 128


def _export(length: int, path: str) -> None:
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(2 * HIDDEN, 10)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(Model().eval(), (torch.randn(BATCH, length, FEATURES),), path, dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}})


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(length: int, repeats: int) -> dict:
    import warnings

    import onnxruntime as ort

    import lrpc

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "lstm.onnx")
        _export(length, path)
        start = time.perf_counter()
        compiled = lrpc.compile(path, lrpc.EpsilonPlusFlat(), verbose=False)
        compile_s = time.perf_counter() - start
        data = compiled.SerializeToString()
        x = np.random.default_rng(0).standard_normal((BATCH, length, FEATURES)).astype(np.float32)
        plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        explain = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return {
            "T": length, "compile_s": compile_s, "export_kib": os.path.getsize(path) / 1024,
            "compiled_kib": len(data) / 1024, "nodes": len(compiled.graph.node),
            "inference_ms": 1e3 * _median(lambda: plain.run(None, {"x": x}), repeats),
            "explain_ms": 1e3 * _median(lambda: explain.run(None, {"x": x}), repeats),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    rows = [measure(length, args.repeats) for length in LENGTHS]
    for r in rows:
        print(f"T={r['T']}: compile {r['compile_s']:.1f} s, file {r['compiled_kib']:.0f} KiB "
              f"(export {r['export_kib']:.0f} KiB, {r['nodes']} nodes), inference {r['inference_ms']:.1f} ms, "
              f"explanation {r['explain_ms']:.1f} ms ({r['explain_ms'] / r['inference_ms']:.1f}×)")
    if args.output:
        import run

        info = run.machine_info(len(os.sched_getaffinity(0)))
        lines = [*run.section_head("Recurrent layers: an LSTM written out in its time steps", info),
                 f"- Bidirectional two-layer LSTM, {FEATURES} inputs, {HIDDEN} hidden units, batch {BATCH}, "
                 "EpsilonPlusFlat; median of "
                 f"{args.repeats}; command: `python benchmarks/recurrent.py --output BENCHMARKS.md`", "",
                 "| T | compile (s) | compiled file (KiB) | export (KiB) | nodes | inference (ms) | explanation (ms) "
                 "| ratio |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                 *[f"| {r['T']} | {r['compile_s']:.1f} | {r['compiled_kib']:.0f} | {r['export_kib']:.0f} | "
                   f"{r['nodes']} | {r['inference_ms']:.1f} | {r['explain_ms']:.1f} | "
                   f"{r['explain_ms'] / r['inference_ms']:.1f}× |" for r in rows], "",
                 "The compiled file runs the export's own LSTM for the outputs and the written-out steps for the "
                 "relevance pass: its size and its explanation grow linearly in T (one MatMul per step and "
                 "direction, shared weights), and so does the compile time."]
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
