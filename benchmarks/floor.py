"""The arithmetic floor of an explanation, measured: the compiled file's convolutions alone.

An LRP rule needs a fixed number of convolutions (or GEMMs) per layer: the forward one, the
denominators (``z⁺``, ``z⁻``, ``z_low``, ...) and the VJPs that carry relevance back. The
floor of a compiled file is the time of exactly those, at the same sizes, with nothing
between them: no elementwise rule arithmetic, no layout reorders. This script builds that
graph from the compiled file itself (every ``Conv``, ``ConvTranspose``, ``Gemm`` and
``MatMul`` node, each reading its own random input of the shape it sees there, weights
replaced by random tensors of the same shape), times it in onnxruntime with the same
session options as the compiled file, and reports lrpc's time over the floor and over plain
inference.

    python benchmarks/floor.py                         # ResNet-50 (1, 8), VGG-16 (1), MobileNetV2 (8)
    python benchmarks/floor.py --output BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-floor-bench:begin -->", "<!-- lrpc-floor-bench:end -->"
HEAVY = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PLAN = (("resnet50", 1), ("resnet50", 8), ("vgg16", 1), ("mobilenet_v2", 8))
COMPOSITES = {"EpsilonPlusFlat": "EpsilonPlusFlat()", "Epsilon": "Composite(GlobalMap(EpsilonRule()))"}


def _fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return model


def floor_model(compiled: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, int]:
    """The graph of the compiled file's heavy nodes alone; returns it and how many of them it
    holds (nodes whose input shapes cannot be inferred are left out and counted as missing)."""
    inferred = shape_inference.infer_shapes(_fixed_batch(compiled, batch), data_prop=True)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    rng = np.random.default_rng(0)
    nodes, inputs, initializers, outputs, missing = [], [], [], [], 0
    for index, node in enumerate(inferred.graph.node):
        if node.op_type not in HEAVY:
            continue
        operands = [name for name in node.input if name]
        if any(name not in shapes for name in operands):
            missing += 1
            continue
        names = []
        for slot, name in enumerate(operands):
            fresh = f"n{index}_{slot}"
            values = rng.standard_normal(shapes[name]).astype(np.float32)
            if slot == 0:  # the data: a graph input, so nothing is folded at session start
                inputs.append(helper.make_tensor_value_info(fresh, onnx.TensorProto.FLOAT, shapes[name]))
            else:
                initializers.append(numpy_helper.from_array(values, fresh))
            names.append(fresh)
        out = f"n{index}_out"
        nodes.append(helper.make_node(node.op_type, names, [out], name=f"floor_{index}",
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "floor", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=list(compiled.opset_import))
    model.ir_version = compiled.ir_version
    return model, missing


def measure(name: str, batch: int, composite: str, threads: int, repeats: int) -> dict:
    import models
    import run

    import lrpc

    path = models.onnx_path(name, str(ROOT / ".bench" / "models"))
    compiled = lrpc.compile(path, lrpc.parse_composite(composite), verbose=False)
    floor, missing = floor_model(compiled, batch)
    x = models.example_input(batch)
    plain, _ = run.ort_session(onnx.load(path).SerializeToString(), threads)
    explained, _ = run.ort_session(compiled.SerializeToString(), threads)
    floored, _ = run.ort_session(floor.SerializeToString(), threads)
    floor_feeds = {i.name: np.random.default_rng(1).standard_normal(
        [d if isinstance(d, int) else batch for d in i.shape]).astype(np.float32) for i in floored.get_inputs()}
    result = {"model": name, "batch": batch, "composite": composite, "heavy_nodes": len(floor.graph.node),
              "missing": missing}
    timings = run.measure_interleaved({"plain": lambda: plain.run(None, {"input": x}),
                                       "lrpc": lambda: explained.run(None, {"input": x}),
                                       "floor": lambda: floored.run(None, floor_feeds)}, warmup=1, repeats=repeats)
    return {**result, **{f"{name}_ms": timing.median_ms for name, (timing, _) in timings.items()}}


def main(argv=None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES))
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    import run

    rows = []
    for label in args.composites:
        for name, batch in PLAN:
            row = measure(name, batch, COMPOSITES[label], args.threads, args.repeats)
            row["label"] = label
            rows.append(row)
            print(f"{label:15s} {name:13s} batch {batch}: plain {row['plain_ms']:.0f} ms, lrpc {row['lrpc_ms']:.0f} ms, "
                  f"floor {row['floor_ms']:.0f} ms ({row['heavy_nodes']} conv/gemm nodes, {row['missing']} left out)"
                  f" -> lrpc/floor {row['lrpc_ms'] / row['floor_ms']:.2f}x, lrpc/plain "
                  f"{row['lrpc_ms'] / row['plain_ms']:.2f}x", flush=True)
    if args.output:
        info = run.machine_info(args.threads)
        lines = [*run.section_head("The floor: the compiled file's convolutions alone", info),
                 f"- Settings: {args.threads} intra-op threads, median of {args.repeats} interleaved rounds",
                 "- Floor: every Conv, ConvTranspose, Gemm and MatMul of the compiled file, at the sizes it sees "
                 "there, each on its own random input, in one session (`benchmarks/floor.py`); the goal is "
                 "lrpc ≤ 1.15× the floor", "",
                 "| composite | model | batch | plain ms | floor ms | lrpc ms | lrpc/floor | lrpc/plain | floor/plain |"
                 " goal |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            ratio = r["lrpc_ms"] / r["floor_ms"]
            lines.append(f"| {r['label']} | {r['model']} | {r['batch']} | {r['plain_ms']:.0f} | {r['floor_ms']:.0f} | "
                         f"{r['lrpc_ms']:.0f} | {ratio:.2f}x | {r['lrpc_ms'] / r['plain_ms']:.2f}x | "
                         f"{r['floor_ms'] / r['plain_ms']:.2f}x | {'PASS' if ratio <= 1.15 else 'FAIL'} |")
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
