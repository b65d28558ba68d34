"""K classes in one call against K single calls (ResNet-50, EpsilonPlusFlat).

A file compiled with ``targets=K`` runs the forward pass and the rule's denominators once
and the relevance pass K times; K single calls run everything K times. The floor of the
ratio is about (2 + K) / 3K for ZPlus (three convolutions per layer, one of them per
target): 0.42 at K = 8; the goal is ≤ 0.45.

    python benchmarks/targets.py [--k 8] [--batch 1] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-targets-bench:begin -->", "<!-- lrpc-targets-bench:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    import models
    import run

    import lrpc

    path = models.onnx_path(args.model, str(ROOT / ".bench" / "models"))
    x = models.example_input(args.batch)
    start = time.perf_counter()
    several = lrpc.compile(path, lrpc.EpsilonPlusFlat(), targets=args.k, verbose=False)
    compile_s = time.perf_counter() - start
    single = lrpc.compile(path, lrpc.EpsilonPlusFlat(), verbose=False)
    session_k, _ = run.ort_session(several.SerializeToString(), args.threads)
    session_1, _ = run.ort_session(single.SerializeToString(), args.threads)
    classes = np.argsort(-session_1.run(None, {"input": x})[0], axis=1)[:, :args.k]

    def one_call():
        return session_k.run(None, {"input": x})

    def k_calls():
        return [session_1.run(None, {"input": x, "lrp_target": classes[:, j].copy()}) for j in range(args.k)]

    timings = run.measure_interleaved({"one": one_call, "apart": k_calls}, warmup=1, repeats=args.repeats)
    one_ms, k_ms = timings["one"][0].median_ms, timings["apart"][0].median_ms
    ratio = one_ms / k_ms
    floor = (2 + args.k) / (3 * args.k)
    print(f"{args.model} batch {args.batch}, K={args.k}: one call {one_ms:.0f} ms, {args.k} single calls "
          f"{k_ms:.0f} ms -> {ratio:.2f} (floor {floor:.2f}); compile {compile_s:.1f} s")
    if args.output:
        info = run.machine_info(args.threads)
        lines = [*run.section_head("K classes in one call", info),
                 f"- Settings: {args.threads} intra-op threads, median of {args.repeats} interleaved rounds",
                 f"- Command: `python benchmarks/targets.py --k {args.k} --batch {args.batch} --output BENCHMARKS.md`",
                 "", "| model | batch | K | one call ms | K single calls ms | ratio | floor (2+K)/3K | goal ≤ 0.45 | "
                 "compile s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
                 f"| {args.model} | {args.batch} | {args.k} | {one_ms:.0f} | {k_ms:.0f} | {ratio:.2f} | {floor:.2f} | "
                 f"{'PASS' if ratio <= 0.45 else 'FAIL'} | {compile_s:.1f} |"]
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
