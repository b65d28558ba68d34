"""Peak resident memory of one explanation, each contender in a fresh process.

For each model and batch, a child process loads one contender, runs it twice on the seeded
input, and reports its peak resident set (``VmHWM``, read from the OS before it exits):

* **plain**: onnxruntime inference of the exported model;
* **lrpc**: the compiled file (EpsilonPlusFlat) in onnxruntime, logits and relevance;
* **Zennit**: ``zennit.attribution.Gradient`` with the mirrored composite on the
  BatchNorm-fused torch model.

Each child starts from the same imports of its own stack, so the numbers include the
interpreter and libraries (about 0.1-0.4 GiB); the goal is lrpc ≤ 2.5× plain.

    python benchmarks/memory.py [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-memory-bench:begin -->", "<!-- lrpc-memory-bench:end -->"
PLAN = (("resnet50", 1), ("resnet50", 8), ("vgg16", 1), ("mobilenet_v2", 8))
CONTENDERS = ("plain", "lrpc", "zennit")


def child(contender: str, name: str, batch: int, threads: int) -> None:
    """Runs in the child process: one contender, twice; prints its peak RSS in bytes."""
    import models
    import run

    x = models.example_input(batch)
    if contender == "zennit":
        import torch

        torch.set_num_threads(threads)
        attributor, call = run.zennit_runner(models.build(name), "EpsilonPlusFlat")
        with attributor:
            for _ in range(2):
                call(torch.from_numpy(x))
    else:
        path = models.onnx_path(name, str(ROOT / ".bench" / "models"))
        if contender == "lrpc":
            compiled = ROOT / ".bench" / "compiled" / f"{name}.memory.lrp.onnx"
            path = str(compiled)
        # lrpc: the session options lrpc.LRP opens the file with (no memory pattern); plain:
        # onnxruntime's defaults
        session, _ = run.ort_session(path, threads, mem_pattern=contender != "lrpc")
        for _ in range(2):
            session.run(None, {"input": x})
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its
    # parent's size; the high-water mark belongs to this process's own address space
    status = Path("/proc/self/status").read_text().splitlines()
    print(json.dumps({"peak": int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024}))


def kept_activation_bytes(compiled: Path, batch: int) -> int:
    """The floor above plain inference: the bytes of the forward tensors the relevance pass
    reads (each lives until the backward reaches its layer, so all of them are alive when
    the forward ends), from onnx's shape inference of the compiled file at ``batch``."""
    import numpy as np
    import onnx

    model = onnx.load(str(compiled))
    for i in model.graph.input:
        if i.name == "input":
            i.type.tensor_type.shape.dim[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    forward = {o for n in model.graph.node if not n.name.startswith("lrp/") for o in n.output} | {"input"}
    read = {x for n in model.graph.node if n.name.startswith("lrp/") for x in n.input if x in forward}
    return sum(int(np.prod(dims[t])) * 4 for t in read if dims.get(t) and all(dims[t]))


def peak(contender: str, name: str, batch: int, threads: int) -> int:
    done = subprocess.run([sys.executable, __file__, "--child", contender, name, str(batch), str(threads)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{contender} on {name} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-zennit", action="store_true")
    parser.add_argument("--output")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        contender, name, batch, threads = args.child
        child(contender, name, int(batch), int(threads))
        return 0

    import models
    import run

    import lrpc

    contenders = [c for c in CONTENDERS if not (args.no_zennit and c == "zennit")]
    rows = []
    for name, batch in PLAN:
        compiled = ROOT / ".bench" / "compiled" / f"{name}.memory.lrp.onnx"
        if not compiled.exists():
            lrpc.compile_file(models.onnx_path(name, str(ROOT / ".bench" / "models")), compiled,
                              lrpc.EpsilonPlusFlat())
        row = {"model": name, "batch": batch, **{c: peak(c, name, batch, args.threads) for c in contenders},
               "kept": kept_activation_bytes(compiled, batch)}
        rows.append(row)
        gib = {c: row[c] / 2**30 for c in contenders}
        print(f"{name:13s} batch {batch}: " + ", ".join(f"{c} {v:.2f} GiB" for c, v in gib.items())
              + f" -> lrpc/plain {row['lrpc'] / row['plain']:.2f}x; floor (plain + kept activations "
              f"{row['kept'] / 2**30:.2f} GiB) {(row['plain'] + row['kept']) / row['plain']:.2f}x", flush=True)
    if args.output:
        info = run.machine_info(args.threads)
        head = "| model | batch | plain GiB | lrpc GiB | lrpc/plain | kept activations GiB | floor/plain |" + (
            " Zennit GiB | Zennit/lrpc |" if "zennit" in contenders else "") + " goal |"
        lines = [*run.section_head("Peak memory of one explanation", info),
                 "- Each contender in a fresh process, two calls on the seeded input, peak resident set as the OS "
                 "reports it (interpreter and libraries included); lrpc: EpsilonPlusFlat, in the session options "
                 "lrpc.LRP uses (no onnxruntime memory pattern), plain: onnxruntime's defaults; goal lrpc ≤ 2.5× plain",
                 "- Floor: plain's peak plus the forward activations the relevance pass reads (all alive when the "
                 "forward ends: the backward needs each layer's input); a goal below it cannot be met by any "
                 "schedule of this pass", "",
                 head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if "zennit" in contenders
                                                                           else "") + " --- |"]
        for r in rows:
            ratio = r["lrpc"] / r["plain"]
            zennit = (f" {r['zennit'] / 2**30:.2f} | {r['zennit'] / r['lrpc']:.2f}x |" if "zennit" in contenders
                      else "")
            floor = (r["plain"] + r["kept"]) / r["plain"]
            verdict = "PASS" if ratio <= 2.5 else ("FAIL (goal below the floor)" if floor > 2.5 else "FAIL")
            lines.append(f"| {r['model']} | {r['batch']} | {r['plain'] / 2**30:.2f} | {r['lrpc'] / 2**30:.2f} | "
                         f"{ratio:.2f}x | {r['kept'] / 2**30:.2f} | {floor:.2f}x |{zennit} {verdict} |")
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
