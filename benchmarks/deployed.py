"""Deployed forms of ResNet-50: an explanation of the int8 (QDQ, QOperator) and float16
files against the float32 one, and against plain inference of each (EpsilonPlusFlat).

Forms are built by the tools that make them: onnxruntime's ``quantize_static`` (after its
``quant_pre_process``, calibrated on 4 random batches) and onnxconverter-common's float16
converter (``keep_io_types``). The compiled file runs the deployed forward untouched plus a
float32 analysis twin (see the README), so the floor of its cost is the deployed forward
plus the float32 explanation's.

    python benchmarks/deployed.py [--batches 1 8] [--repeats 5] [--output BENCHMARKS.md]
    python benchmarks/deployed.py --providers cuda --forms float32 "int8 QDQ" float16 --json out.json

On a GPU (``--providers cuda``: onnxruntime-gpu's CUDA execution provider, the session
refused if it would fall back to the CPU) the same files are timed there; the relevance is
also compared with the CPU's.
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


PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def build_forms(float32: str, directory: str, forms=FORMS) -> dict[str, str]:
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
        if form not in forms:
            continue
        paths[form] = os.path.join(directory, form.replace(" ", "-") + ".onnx")
        quantize_static(pre, paths[form], Calibration(), quant_format=fmt)
    if "float16" in forms:
        paths["float16"] = os.path.join(directory, "float16.onnx")
        onnx.save(float16.convert_float_to_float16(onnx.load(float32), keep_io_types=True), paths["float16"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--providers", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--output")
    parser.add_argument("--json", help="also write the rows as JSON (for runs on another machine)")
    args = parser.parse_args(argv)
    providers = PROVIDERS[args.providers]
    if args.providers == "cuda":
        import onnxruntime

        onnxruntime.preload_dlls()  # CUDA and cuDNN from the nvidia pip packages beside torch

    import models
    import run

    import lrpc

    float32 = models.onnx_path("resnet50", str(ROOT / ".bench" / "models"))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        run.log("building the deployed forms")
        paths = build_forms(float32, directory, args.forms)
        sessions, compile_s = {}, {}
        for form, path in paths.items():
            start = time.perf_counter()
            compiled = lrpc.compile(path, lrpc.EpsilonPlusFlat(), verbose=False)
            compile_s[form] = time.perf_counter() - start
            sessions[form] = (run.ort_session(path, args.threads, providers=providers)[0],
                              run.ort_session(compiled.SerializeToString(), args.threads, providers=providers)[0])
            if args.providers != "cpu":  # the same file on the CPU: the relevance must not depend on where it runs
                cpu = run.ort_session(compiled.SerializeToString(), args.threads)[0]
                x = models.example_input(1)
                device_relevance = sessions[form][1].run(None, {"input": x})[1]
                run.log(f"{form}: relevance on {args.providers} vs CPU "
                        f"{run._rel_err(device_relevance, cpu.run(None, {'input': x})[1]):.1e}")
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
                floor = f32_explain + (inference if form != "float32" else 0.0)
                rows.append((form, batch, inference, explain, explain / inference, explain / f32_explain,
                             explain / floor, compile_s[form], agreement))
                run.log(f"{form} batch {batch}: inference {inference:.0f} ms, explanation {explain:.0f} ms")
    header = ("| form | batch | inference ms | explanation ms | explanation / its inference | "
              "explanation / float32's | explanation / floor | compile s | relevance vs float32's |")
    table = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| {f} | {b} | {i:.0f} | {e:.0f} | {r:.2f} | {rf:.2f} | {fl:.2f} | {c:.1f} | {a:.1e} |"
              for f, b, i, e, r, rf, fl, c, a in rows]
    print("\n".join(table))
    if args.json:
        import json

        keys = ("form", "batch", "inference_ms", "explain_ms", "explain_per_inference", "explain_per_float32",
                "explain_per_floor", "compile_s", "relevance_vs_float32")
        with open(args.json, "w") as handle:
            json.dump({"providers": args.providers, "rows": [dict(zip(keys, r)) for r in rows]}, handle, indent=1)
    if args.output:
        info = run.machine_info(args.threads)
        where = "" if args.providers == "cpu" else f" on {args.providers.upper()}"
        lines = [*run.section_head(f"Deployed forms: int8 and float16 ResNet-50{where}", info),
                 *([f"- GPU: {run._run(['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader'])}; "
                    f"onnxruntime {__import__('onnxruntime').__version__}"] if where else []),
                 f"- Settings: {args.threads} intra-op threads, EpsilonPlusFlat, median of {args.repeats} "
                 "interleaved rounds; int8 by onnxruntime's quantize_static, float16 by onnxconverter-common",
                 f"- Command: `python benchmarks/deployed.py --providers {args.providers} --batches "
                 f"{' '.join(map(str, args.batches))} --output BENCHMARKS.md`",
                 "- Floor: the deployed file's own inference plus the float32 explanation (the compiled file runs "
                 "both: the deployed forward for the outputs, the float32 twin for the relevance). Above it: the "
                 "twin's roundings (four elementwise ops per rounded activation: QDQ rounds every activation).",
                 "- The relevance of an int8 file is its own (its activations are rounded), so it is not the float32 "
                 "file's: the last column says how far.", "", *table]
        begin, end = (BEGIN, END) if not where else (BEGIN.replace(":begin", f"-{args.providers}:begin"),
                                                     END.replace(":end", f"-{args.providers}:end"))
        run.write_section(args.output, lines, begin, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
