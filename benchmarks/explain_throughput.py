"""``lrpc explain`` over a folder against the bare session: how much does reading cost?

For the bundled digits model (a ``.npy`` batch) and ResNet-18 at 224x224 (a folder of JPEG
files, decoded and resized by ``lrpc explain``), times

* **bare**: ``lrpc.LRP.analyze`` on arrays already in memory, batch by batch (what the
  session alone can do);
* **explain**: the ``lrpc explain`` command in this process, ``--no-heatmaps -q`` (reading,
  preprocessing, the same session, relevance.npz and summary.json), whose reading of the
  next batch overlaps the current batch's inference.

Goal: explain ≥ 90 % of bare.

    python benchmarks/explain_throughput.py [--images 256] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- lrpc-explain-bench:begin -->", "<!-- lrpc-explain-bench:end -->"


def write_images(folder: Path, count: int, size: int = 256) -> None:
    """Smooth seeded colour images, larger than 224 so that explain resizes them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"img_{i:05d}.jpg", quality=90)


def bare(analyzer, x: np.ndarray, batch: int) -> float:
    analyzer.analyze(x[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        analyzer.analyze(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def explain_seconds(model: Path, inputs: list[Path], batch: int, extra: list[str]) -> float:
    from lrpc.cli import main

    out = Path(tempfile.mkdtemp(prefix="lrpc-explain-bench-"))
    try:
        start = time.perf_counter()
        code = main(["explain", str(model), *map(str, inputs), "-o", str(out / "result"), "--no-heatmaps", "-q",
                     "--batch-size", str(batch), *extra])
        elapsed = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"lrpc explain failed with exit {code}")
        return elapsed
    finally:
        shutil.rmtree(out, ignore_errors=True)


def explain(model: Path, everything: list[Path], one_batch: list[Path], count: int, batch: int,
            extra: list[str]) -> tuple[float, float]:
    """(samples/s once running, fixed seconds): a run over one batch and one over all; the
    difference is the rate at which explain works through samples, the rest its start
    (session, first call) and finish (writing the results)."""
    short = explain_seconds(model, one_batch, batch, extra)
    full = explain_seconds(model, everything, batch, extra)
    rate = (count - batch) / (full - short)
    return rate, full - count / rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="ResNet-18 images (digits: 100x as many)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    import models
    import run

    import lrpc
    from lrpc.images import collect, load, model_input, plan
    from lrpc.cli import preprocess_from_args, build_parser

    cache = ROOT / ".bench"
    rows = []
    # digits: arrays in a .npy file
    digits = ROOT / "examples" / "digits"
    samples = np.repeat(np.load(digits / "samples.npy"), max(1, args.images * 100 // 20), axis=0)
    npy = cache / "explain" / "digits_many.npy"
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, samples)
    compiled = cache / "compiled" / "digits.lrp.onnx"
    lrpc.compile_file(digits / "digits_cnn.onnx", compiled, lrpc.EpsilonPlus())
    analyzer = lrpc.LRP(compiled)
    first = cache / "explain" / "digits_one_batch.npy"
    np.save(first, samples[:args.batch_size])
    rows.append(("digits 8x8 (.npy)", len(samples), bare(analyzer, samples.astype(np.float32), args.batch_size),
                 *explain(compiled, [npy], [first], len(samples), args.batch_size, [])))
    # the same digits on a local Dask cluster (explain-dataset), whole runs timed, start included
    from lrpc.dataset import explain_dataset

    out = Path(tempfile.mkdtemp(prefix="lrpc-dataset-bench-"))
    try:
        whole_explain = explain_seconds(compiled, [npy], args.batch_size, [])
        result = explain_dataset(compiled, [npy], out / "result", workers=2, shard_size=1024,
                                 batch_size=args.batch_size, threads=1, progress=False)
        distributed = (len(samples), whole_explain, result.seconds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # ResNet-18 at 224: JPEG files
    folder = cache / "explain" / f"jpeg_{args.images}"
    if not folder.exists() or len(list(folder.iterdir())) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        write_images(folder, args.images)
    compiled = cache / "compiled" / "resnet18.lrp.onnx"
    if not compiled.exists():
        lrpc.compile_file(models.onnx_path("resnet18", str(cache / "models")), compiled, lrpc.EpsilonPlusFlat())
    analyzer = lrpc.LRP(compiled)
    options = ["--size", "224", "224", "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    parsed = build_parser().parse_args(["explain", str(compiled), str(folder), "-o", "x", *options])
    spec = model_input(analyzer.session, analyzer.input_name, parsed.layout)
    planned = plan(collect([str(folder)]), spec, preprocess_from_args(parsed))
    x, _ = load(planned, spec, preprocess_from_args(parsed), shown=False)
    files = sorted(folder.iterdir())
    rows.append(("ResNet-18 224x224 (JPEG folder)", args.images, bare(analyzer, x, args.batch_size),
                 *explain(compiled, [folder], files[:args.batch_size], args.images, args.batch_size, options)))
    for name, count, b, e, fixed in rows:
        print(f"{name}: bare {b:.1f}/s, explain {e:.1f}/s ({e / b:.0%}) over {count} samples, plus {fixed:.1f} s "
              "to start and finish")
    count, alone, spread = distributed
    print(f"digits, whole runs over {count} samples: explain {alone:.1f} s, explain-dataset on 2 Dask workers "
          f"{spread:.1f} s")
    if args.output:
        info = run.machine_info(0)
        lines = [*run.section_head("Explaining a folder (`lrpc explain`)", info),
                 f"- Command: `python benchmarks/explain_throughput.py --images {args.images} --output BENCHMARKS.md`; "
                 f"batch {args.batch_size}; explain with `--no-heatmaps -q` (reading, preprocessing, the session, "
                 "relevance.npz, summary.json); bare: `LRP.analyze` on arrays in memory",
                 "- explain's rate is measured once running (a run over all samples minus a run over one batch); "
                 "the start (session, first call) and finish (writing relevance.npz) are the fixed seconds",
                 "", "| input | samples | bare samples/s | explain samples/s | explain/bare | fixed s | goal ≥ 90 % |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, count, b, e, fixed in rows:
            lines.append(f"| {name} | {count} | {b:.1f} | {e:.1f} | {e / b:.0%} | {fixed:.1f} | "
                         f"{'PASS' if e >= 0.9 * b else 'FAIL'} |")
        lines += ["", f"On a local Dask cluster (`lrpc explain-dataset`, 2 workers of 1 thread, shards of 1024): "
                  f"the same {count} digits take {spread:.1f} s against {alone:.1f} s for `lrpc explain` in one "
                  "process (both whole runs, start included)."]
        run.write_section(args.output, lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
