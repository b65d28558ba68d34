"""Deployed forms of ResNet-50: an explanation of the int8 (QDQ, QOperator) and float16
files against the float32 one, and against plain inference of each (EpsilonPlusFlat).

Forms are built by the tools that make them: onnxruntime's ``quantize_static`` (after its
``quant_pre_process``, calibrated on 4 random batches) and onnxconverter-common's float16
converter (``keep_io_types``). The compiled file runs the deployed forward untouched plus a
float32 analysis twin (see the README), so the floor of its cost is the deployed forward
plus the float32 explanation's.

    python benchmarks/deployed.py [--batches 1 8] [--repeats 5] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-deployed-bench:begin -->", "<!-- lrpc-deployed-bench:end -->"
FORMS = ("float32", "int8 QDQ", "int8 QOperator", "float16")


def build_forms(float32: str, directory: str) -> dict[str, str]:
    import onnx
    from onnxconverter_common import float16
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import models

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": models.example_input(2, seed=10 + i)} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    paths = {"float32": float32}
    pre = os.path.join(directory, "pre.onnx")
    quant_pre_process(float32, pre, skip_symbolic_shape=True)
    for form, fmt in (("int8 QDQ", QuantFormat.QDQ), ("int8 QOperator", QuantFormat.QOperator)):
        paths[form] = os.path.join(directory, form.replace(" ", "-") + ".onnx")
        quantize_static(pre, paths[form], Calibration(), quant_format=fmt)
    paths["float16"] = os.path.join(directory, "float16.onnx")
    onnx.save(float16.convert_float_to_float16(onnx.load(float32), keep_io_types=True), paths["float16"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    import models
    import run

    import lrpc

    float32 = models.onnx_path("resnet50", str(ROOT / ".bench" / "models"))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        run.log("building the deployed forms")
        paths = build_forms(float32, directory)
        sessions, compile_s = {}, {}
        for form, path in paths.items():
            start = time.perf_counter()
            compiled = lrpc.compile(path, lrpc.EpsilonPlusFlat(), verbose=False)
            compile_s[form] = time.perf_counter() - start
            sessions[form] = (run.ort_session(path, args.threads)[0],
                              run.ort_session(compiled.SerializeToString(), args.threads)[0])
            run.log(f"{form}: compiled in {compile_s[form]:.1f} s")
        for batch in args.batches:
            x = models.example_input(batch)
            contenders = {}
            for form, (plain, explained) in sessions.items():
                contenders[(form, "inference")] = lambda s=plain: s.run(None, {"input": x})
                contenders[(form, "explain")] = lambda s=explained: s.run(None, {"input": x})
            timings = run.measure_interleaved(contenders, warmup=1, repeats=args.repeats)
            f32_explain = timings[("float32", "explain")][0].median_ms
            for form in paths:
                inference, explain = (timings[(form, kind)][0].median_ms for kind in ("inference", "explain"))
                relevance = timings[(form, "explain")][1][1]
                agreement = run._rel_err(relevance, timings[("float32", "explain")][1][1])
                rows.append((form, batch, inference, explain, explain / inference, explain / f32_explain,
                             compile_s[form], agreement))
                run.log(f"{form} batch {batch}: inference {inference:.0f} ms, explanation {explain:.0f} ms")
    header = ("| form | batch | inference ms | explanation ms | explanation / its inference | "
              "explanation / float32's | compile s | relevance vs float32's |")
    table = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| {f} | {b} | {i:.0f} | {e:.0f} | {r:.2f} | {rf:.2f} | {c:.1f} | {a:.1e} |"
              for f, b, i, e, r, rf, c, a in rows]
    print("\n".join(table))
    if args.output:
        info = run.machine_info(args.threads)
        lines = [*run.section_head("Deployed forms: int8 and float16 ResNet-50", info),
                 f"- Settings: {args.threads} intra-op threads, EpsilonPlusFlat, median of {args.repeats} "
                 "interleaved rounds; int8 by onnxruntime's quantize_static, float16 by onnxconverter-common",
                 f"- Command: `python benchmarks/deployed.py --batches {' '.join(map(str, args.batches))} "
                 "--output BENCHMARKS.md`",
                 "- The relevance of an int8 file is its own (its activations are rounded), so it is not the float32 "
                 "file's: the last column says how far.", "", *table]
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
