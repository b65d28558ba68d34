"""The arithmetic floor of an explanation, measured: the compiled file's convolutions alone.

An LRP rule needs a fixed number of convolutions (or GEMMs) per layer: the forward one, the
denominators (``z⁺``, ``z⁻``, ``z_low``, ...) and the VJPs that carry relevance back. The
floor of a compiled file is the time of exactly those, at the same sizes, with nothing
between them: no elementwise rule arithmetic, no layout reorders. This script builds those
graphs (consecutive ones of at most 768 MiB of tensors; each model in a fresh process) from
the compiled file itself (every ``Conv``, ``ConvTranspose``, ``Gemm`` and
``MatMul`` node, each reading its own random input of the shape it sees there, weights
replaced by random tensors of the same shape), times it in onnxruntime with the same
session options as the compiled file, and reports lrpc's time over the floor and over plain
inference.

    python benchmarks/floor.py                         # ResNet-50 (1, 8), VGG-16 (1), MobileNetV2 (8)
    python benchmarks/floor.py --output BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
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


#: the most a floor graph's inputs and outputs may take at once: the heavy nodes are timed in
#: consecutive graphs of about this size (ResNet-50 at batch 8 in one graph held 11 GiB)
CHUNK_BYTES = 768 << 20


def floor_model(compiled: onnx.ModelProto, batch: int) -> tuple[list[onnx.ModelProto], int]:
    """The compiled file's heavy nodes alone, as consecutive graphs whose inputs and outputs
    stay under ``CHUNK_BYTES`` each (their times add up to the floor); returns them and how
    many heavy nodes were left out (input shapes that cannot be inferred)."""
    inferred = shape_inference.infer_shapes(_fixed_batch(compiled, batch), data_prop=True)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    rng = np.random.default_rng(0)
    chunks, missing = [], 0
    nodes, inputs, initializers, outputs, size = [], [], [], [], 0
    weights: set[str] = set()

    def close():
        if nodes:
            graph = helper.make_graph(list(nodes), f"floor_{len(chunks)}", list(inputs), list(outputs),
                                      list(initializers))
            model = helper.make_model(graph, opset_imports=list(compiled.opset_import))
            model.ir_version = compiled.ir_version
            chunks.append(model)
        for part in (nodes, inputs, initializers, outputs, weights):
            part.clear()

    for index, node in enumerate(inferred.graph.node):
        if node.op_type not in HEAVY:
            continue
        operands = [name for name in node.input if name]
        if any(name not in shapes for name in operands):
            missing += 1
            continue
        out_shape = shapes.get(node.output[0])
        node_bytes = 4 * (int(np.prod(shapes[operands[0]])) + (int(np.prod(out_shape)) if out_shape else 0))
        if nodes and size + node_bytes > CHUNK_BYTES:
            close()
            size = 0
        size += node_bytes
        names = []
        for slot, name in enumerate(operands):
            if slot == 0:  # the data: a graph input, so nothing is folded at session start
                fresh = f"n{index}_{slot}"
                inputs.append(helper.make_tensor_value_info(fresh, onnx.TensorProto.FLOAT, shapes[name]))
            else:  # a weight: one random tensor per shape in the graph (VGG-16's FC weights, read by
                # every rule's term, took 10.5 GiB as a copy per node)
                fresh = "w_" + "x".join(map(str, shapes[name]))
                if fresh not in weights:
                    weights.add(fresh)
                    initializers.append(numpy_helper.from_array(
                        rng.standard_normal(shapes[name]).astype(np.float32), fresh))
            names.append(fresh)
        out = f"n{index}_out"
        nodes.append(helper.make_node(node.op_type, names, [out], name=f"floor_{index}",
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        outputs.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    close()
    return chunks, missing


_SHARED_ARENA = []


def _shared_arena_session(model: onnx.ModelProto, threads: int):
    """A floor graph's session on one arena that every floor graph shares (each session's own
    arena would keep its peak: together, the one graph's memory again)."""
    import onnxruntime as ort

    import run

    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _SHARED_ARENA.append(info)
    options = run.ort_options(threads)
    options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _random_feeds(session, batch: int, cache: dict) -> dict:
    """One random array per input shape, shared by every input of that shape."""
    feeds = {}
    for i in session.get_inputs():
        shape = tuple(d if isinstance(d, int) else batch for d in i.shape)
        if shape not in cache:
            cache[shape] = np.random.default_rng(len(cache) + 1).standard_normal(shape).astype(np.float32)
        feeds[i.name] = cache[shape]
    return feeds


def measure(name: str, batch: int, composite: str, threads: int, repeats: int) -> dict:
    import models
    import run

    import lrpc

    path = models.onnx_path(name, str(ROOT / ".bench" / "models"))
    compiled = lrpc.compile(path, lrpc.parse_composite(composite), verbose=False)
    chunks, missing = floor_model(compiled, batch)
    x = models.example_input(batch)
    plain, _ = run.ort_session(onnx.load(path).SerializeToString(), threads)
    explained, _ = run.ort_session(compiled.SerializeToString(), threads)
    cache: dict = {}
    floored = [_shared_arena_session(chunk, threads) for chunk in chunks]
    floor_feeds = [_random_feeds(session, batch, cache) for session in floored]
    result = {"model": name, "batch": batch, "composite": composite, "missing": missing,
              "heavy_nodes": sum(len(chunk.graph.node) for chunk in chunks), "floor_graphs": len(chunks)}

    def floor_run():
        for session, feeds in zip(floored, floor_feeds):
            session.run(None, feeds)

    timings = run.measure_interleaved({"plain": lambda: plain.run(None, {"input": x}),
                                       "lrpc": lambda: explained.run(None, {"input": x}),
                                       "floor": floor_run}, warmup=1, repeats=repeats)
    return {**result, **{f"{name}_ms": timing.median_ms for name, (timing, _) in timings.items()}}


def main(argv=None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=list(COMPOSITES))
    parser.add_argument("--output")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "COMPOSITE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import run

    if args.one:  # one measurement, in a process of its own (its memory gone when it ends)
        name, batch, composite = args.one
        print("RESULT " + json.dumps(measure(name, int(batch), composite, args.threads, args.repeats)), flush=True)
        return 0
    rows = []
    for label in args.composites:
        for name, batch in PLAN:
            done = subprocess.run([sys.executable, __file__, "--one", name, str(batch), COMPOSITES[label],
                                   "--threads", str(args.threads), "--repeats", str(args.repeats)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
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
                 "there, each on its own random input (weights: one random tensor per shape), in consecutive graphs of at most 768 MiB of tensors on one "
                 "arena, each model in a process of its own (`benchmarks/floor.py`); the goal is "
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
