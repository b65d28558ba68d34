"""``lrpc compile | check | inspect | explain``.

Bad input gets one clear line on stderr (the model-check table for unsupported ops) and
exit code 2; nothing is left half-written. Set ``LRPC_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
EXIT_INTERNAL = 70


def _composite_from_args(args):
    """The composite named on the command line, or None (the default, EpsilonPlusFlat)."""
    from .errors import CompositeSyntaxError
    from .expressions import load_rules_file, parse_composite

    rules, composite = getattr(args, "rules", None), getattr(args, "composite", None)
    if rules is not None and composite is not None:
        raise CompositeSyntaxError("give --composite or --rules, not both")
    if rules is not None:
        return load_rules_file(rules)
    if composite is not None:
        return parse_composite(composite)
    return None


def _print_table(table) -> None:
    """Print a rich table at its natural width: node names must not be cut, even in a pipe."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(highlight=False)
    width = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    Console(highlight=False, width=max(console.width, width)).print(table)


def _add_model_options(p: argparse.ArgumentParser, composite: bool = True) -> None:
    p.add_argument("model", help="ONNX model file")
    if composite:
        p.add_argument(
            "--composite", "-c",
            help='preset or expression, e.g. EpsilonPlusFlat, "EpsilonGammaBox(low=-3.0, high=3.0)", '
                 '"Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))" (default: EpsilonPlusFlat)',
        )
        p.add_argument("--rules", help="TOML rules file (see README)")
    p.add_argument("--input", dest="input_name", help="input to explain (default: the first)")
    p.add_argument("--output", dest="output_name", help="output whose class is explained (default: the first)")
    p.add_argument("--skip-checks", action="store_true", help="compile even if the model check fails")


def cmd_compile(args) -> int:
    from .compiler import compile_file
    from .errors import LrpcError

    out = Path(args.output_file) if args.output_file else Path(args.model).with_suffix(".lrp.onnx")
    if out.is_dir():
        raise LrpcError(f"{out}: is a directory; give a file name with -o")
    from .crp import parse_features

    if (args.crp_layer is None) != (args.features is None):
        raise LrpcError("--crp-layer and --features go together")
    model = compile_file(
        args.model, out, _composite_from_args(args),
        input_name=args.input_name, output_name=args.output_name,
        normalize_output_relevance=not args.no_normalize_output_relevance,
        skip_checks=args.skip_checks,
        external_data=True if args.external_data else None,
        relevance_at=args.relevance_at or (),
        crp_layer=args.crp_layer,
        features=parse_features(args.features) if args.features is not None else None,
    )
    if not args.quiet:
        import onnx

        extras = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
        print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB); outputs: {', '.join(extras)}")
    return 0


def cmd_check(args) -> int:
    from .compiler import analyze_model

    analysis = analyze_model(args.model, input_name=args.input_name, output_name=args.output_name,
                             skip_checks=True)
    report = analysis.report
    _print_table(report.table())
    if report.ok:
        print(f"model check passed: {len(analysis.table.layers)} layers")
        return 0
    print(f"lrpc: error: model check failed: {len(report.failures)} unsupported node(s)", file=sys.stderr)
    return EXIT_USAGE


def cmd_inspect(args) -> int:
    from .compiler import analyze_model
    from .inspection import layer_table

    analysis = analyze_model(args.model, _composite_from_args(args), input_name=args.input_name,
                             output_name=args.output_name, skip_checks=args.skip_checks)
    _print_table(layer_table(analysis, with_rules=True))
    return 0

def _read_inputs(paths: list[str]) -> np.ndarray:
    from .errors import InputError

    arrays = []
    for p in paths:
        path = Path(p)
        if path.suffix.lower() != ".npy":
            raise InputError(f"{p}: only .npy inputs are supported")
        if not path.exists():
            raise InputError(f"{p}: no such file")
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except (ValueError, OSError) as exc:
            raise InputError(f"{p}: not a readable .npy array ({exc})") from None
    shapes = {a.shape[1:] if a.ndim > 1 else a.shape for a in arrays}
    try:
        return np.concatenate(arrays, axis=0)
    except ValueError:
        raise InputError(f"inputs have different sample shapes: {sorted(shapes)}") from None


def cmd_explain(args) -> int:
    from .graph import atomic_path
    from .heatmap import heatmap, save_png
    from .runtime import LRP

    from .errors import LrpcError

    outdir = Path(args.output_dir)
    if outdir.exists() and not outdir.is_dir():
        raise LrpcError(f"{outdir}: exists and is not a folder")
    x = _read_inputs(args.inputs)
    analyzer = LRP(args.model, _composite_from_args(args), input_name=args.input_name,
                   output_name=args.output_name, skip_checks=args.skip_checks,
                   normalize_output_relevance=not args.no_normalize_output_relevance)
    expl = analyzer.analyze(x, args.target)
    outdir.mkdir(parents=True, exist_ok=True)
    images = heatmap(expl) if expl.val.ndim in (3, 4) else []
    summary = []
    for i in range(len(x)):
        entry = {
            "index": i,
            "prediction": int(np.argmax(expl.output[i])),
            "target": int(expl.output_selection[i]),
            "relevance_sum": float(expl.val[i].sum()),
        }
        if images:
            png = outdir / f"heatmap_{i:03d}.png"
            save_png(images[i], png, scale=args.scale)
            entry["heatmap"] = png.name
        summary.append(entry)
    with atomic_path(outdir / "relevance.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, relevance=expl.val, output=expl.output, target=expl.output_selection)
    with atomic_path(outdir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    for entry in summary:
        print(f"sample {entry['index']}: predicted {entry['prediction']}, explained {entry['target']}, "
              f"sum(relevance) = {entry['relevance_sum']:.4f}" + (f" -> {outdir / entry['heatmap']}" if images else ""))
    print(f"wrote {len(images)} heatmap(s), relevance.npz and summary.json to {outdir}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lrpc", description="LRP attribution compiler for ONNX models")
    parser.add_argument("--version", action="version", version=f"lrpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="write MODEL.lrp.onnx: the model's outputs plus 'relevance'")
    _add_model_options(p)
    p.add_argument("-o", dest="output_file", help="output file (default: MODEL.lrp.onnx)")
    p.add_argument("--no-normalize-output-relevance", action="store_true",
                   help="start from the explained logit instead of 1")
    p.add_argument("--external-data", action="store_true",
                   help="write the weights to OUT.data beside the model (automatic near 2 GiB)")
    p.add_argument("--relevance-at", nargs="+", metavar="LAYER",
                   help="also output the relevance at these layers (index or node name) or tensors")
    p.add_argument("--crp-layer", metavar="LAYER", help="Concept Relevance Propagation at this layer's output")
    p.add_argument("--features", metavar="SPEC", help="CRP features: top:N (per input) or indices such as 1,2,10")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("check", help="the model check table; exit 2 when something is unsupported")
    _add_model_options(p, composite=False)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("inspect", help="layer indices and the rule each layer gets")
    _add_model_options(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("explain", help="explain .npy inputs: heatmap PNGs, relevance.npz, summary.json")
    _add_model_options(p)
    p.add_argument("inputs", nargs="+", help=".npy files, each one sample batch [N, ...]")
    p.add_argument("-o", dest="output_dir", required=True, help="output folder")
    p.add_argument("--target", type=int, help="class to explain (default: the prediction)")
    p.add_argument("--scale", type=_positive_int, default=1, help="upscale heatmaps by this factor")
    p.add_argument("--no-normalize-output-relevance", action="store_true")
    p.set_defaults(run=cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LrpcError, UnsupportedModelError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UnsupportedModelError as exc:
        if exc.report is not None:
            _print_table(exc.report.table(only_failures=True))
            n = len(exc.report.failures)
            print(f"lrpc: error: model check failed: {n} unsupported node(s); register them or use --skip-checks",
                  file=sys.stderr)
        else:
            print(f"lrpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LrpcError as exc:
        print(f"lrpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, unless debugging
        if os.environ.get("LRPC_DEBUG"):
            raise
        print(f"lrpc: internal error: {type(exc).__name__}: {exc} (set LRPC_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
