"""``lrpc compile | check | inspect | explain``.

Bad input gets one clear line on stderr (the model-check table for unsupported ops) and
exit code 2; nothing is left half-written. ``--verbose`` also shows the libraries' own
warnings; ``LRPC_DEBUG=1`` shows tracebacks of internal errors.

Files are ``-o/--output`` everywhere; tensors are ``--input-name`` / ``--output-name``
(``--input`` and a tensor name given to ``--output`` still work, with a deprecation line).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERNAL = 70


# -- shared pieces --------------------------------------------------------------------------------


def _composite_from_args(args):
    """The composite named on the command line, or None (the default, EpsilonPlusFlat), with
    ``--merge-epsilon`` applied."""
    from .errors import CompositeSyntaxError
    from .expressions import load_rules_file, parse_composite

    rules, composite = getattr(args, "rules", None), getattr(args, "composite", None)
    if rules is not None and composite is not None:
        raise CompositeSyntaxError("give --composite or --rules, not both")
    chosen = load_rules_file(rules) if rules is not None else parse_composite(composite) if composite else None
    merge = getattr(args, "merge_epsilon", None)
    if merge is not None:
        from .composites import EpsilonPlusFlat, with_merge_epsilon
        from .rules import MergeRule

        MergeRule(merge)  # the value is checked now, with its name
        chosen = with_merge_epsilon(chosen or EpsilonPlusFlat(), merge)
    return chosen


def _method_from_args(args):
    """The gradient method named by ``--method``, or None (LRP)."""
    text = getattr(args, "method", None)
    if text is None:
        return None
    from .errors import CompositeSyntaxError
    from .expressions import parse_method

    if getattr(args, "composite", None) is not None or getattr(args, "rules", None) is not None:
        raise CompositeSyntaxError("--method replaces LRP's --composite / --rules: give one of them")
    return parse_method(text)


def _print_table(table) -> None:
    """Print a rich table at its natural width: node names must not be cut, even in a pipe."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(highlight=False)
    width = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    Console(highlight=False, width=max(console.width, width)).print(table)


def _warn(message: str) -> None:
    print(f"lrpc: warning: {message}", file=sys.stderr)


def _register_ops(args) -> None:
    """``--treat-as-activation OP`` / ``--pass-through OP``: lrpc.register_activation and a
    shape-keeping pass-through, for this run."""
    from .registry import register_activation, register_layer

    for op in getattr(args, "treat_as_activation", None) or ():
        register_activation(op)
    for op in getattr(args, "pass_through", None) or ():
        register_layer(op, like="Identity")


def _tensor_names(args) -> None:
    """The deprecated spellings: ``--input NAME`` and a tensor name given to ``--output``."""
    if getattr(args, "input_old", None):
        _warn("--input NAME is deprecated (one more release); use --input-name NAME")
        args.input_name = args.input_name or args.input_old
    long_output = getattr(args, "output_long", None)
    if long_output is None:
        return
    # with -o as well, --output is the old tensor spelling; alone, a file unless it names a tensor
    if args.output_short or (long_output in _model_outputs(args.model) and not Path(long_output).suffix
                             and args.command == "compile"):
        _warn(f"--output {long_output} for a tensor is deprecated (one more release); use --output-name "
              f"{long_output}; -o/--output is the output file")
        args.output_name = args.output_name or long_output
        args.output_long = None


def _model_outputs(path) -> set[str]:
    try:
        import onnx

        return {o.name for o in onnx.load(str(path), load_external_data=False).graph.output}
    except Exception:  # the real load reports unreadable files
        return set()


def _add_model_options(p: argparse.ArgumentParser, composite: bool = True) -> None:
    p.add_argument("model", help="ONNX model file")
    _add_verbose(p)
    if composite:
        p.add_argument("--composite", "-c",
                       help='preset or expression, e.g. EpsilonPlusFlat, AttnLRP, "EpsilonGammaBox(low=-3.0, '
                            'high=3.0)", "Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))" (default: EpsilonPlusFlat)')
        p.add_argument("--rules", metavar="FILE.toml", help="TOML rules file (see README)")
        p.add_argument("--merge-epsilon", type=float, metavar="EPS",
                       help="MergeRule(EPS) on residual additions and concatenations (their stabilizer)")
        p.add_argument("--position", type=int,
                       help="sequence outputs [N, T, V] (language models): the position explained (default -1, the last)")
        p.add_argument("--split-layernorm", action="store_true",
                       help="split LayerNorm from its affine part (scale, shift) so each takes its own rule")
    p.add_argument("--method", "-m", metavar="EXPR",
                   help="a gradient method instead of LRP: Gradient, InputTimesGradient, \"SmoothGrad(samples=50, "
                        "stdev=0.1)\", \"IntegratedGradients(steps=32)\", \"GradCAM(layer=5)\" (output 'attribution')")
    p.add_argument("--max-constant-bytes", type=_byte_size, metavar="SIZE",
                   help="the most constant folding may materialize, e.g. 512M or 2G (default: the larger of 256M "
                        "and the model's largest weight)")
    p.add_argument("--input-name", metavar="NAME", help="the model input to explain (default: the first)")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="fix the explained input's dims for compilation, e.g. ?,1,64,160 (? or a name keeps an axis "
                        "dynamic; a recurrent layer over a dynamic sequence length is written out for that length)")
    p.add_argument("--input", dest="input_old", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--output-name", metavar="NAME",
                   help="the model output whose class is explained (default: the first with scores)")
    p.add_argument("--skip-checks", action="store_true", help="compile even if the model check fails")
    p.add_argument("--treat-as-activation", action="append", metavar="OP",
                   help="treat this op type as a ReLU-like activation (relevance passes unchanged); repeatable")
    p.add_argument("--pass-through", action="append", metavar="OP",
                   help="let relevance pass this shape-keeping op type unchanged; repeatable")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    from .images import DEFAULT_MAX_IMAGE_PIXELS, LAYOUTS

    g = p.add_argument_group("images (.npy inputs are fed as they are)")
    g.add_argument("--size", nargs=2, type=_positive_int, metavar=("H", "W"), help="resize images to H x W")
    g.add_argument("--layout", choices=LAYOUTS,
                   help="the model's input layout (default: from its shape, 1 or 3 channels at axis 1 or last)")
    g.add_argument("--grayscale", action="store_true",
                   help="read images as one channel (automatic for one-channel models)")
    g.add_argument("--scale-pixels", action=argparse.BooleanOptionalAction, default=True,
                   help="divide 8-bit pixels by 255")
    g.add_argument("--mean", nargs="+", type=float, metavar="M", help="subtract per channel (after --scale-pixels)")
    g.add_argument("--std", nargs="+", type=float, metavar="S", help="then divide per channel")
    g.add_argument("--max-image-pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,})")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show the libraries' own warnings and, for explain, a line per sample")


def _add_output(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """``-o`` and ``--output`` as two spellings of the output file (or folder); kept apart so
    that an old ``--output TENSOR`` can still be told from ``-o FILE``."""
    p.add_argument("-o", dest="output_short", metavar="PATH", help=help)
    p.add_argument("--output", dest="output_long", metavar="PATH", help=argparse.SUPPRESS)
    p.set_defaults(output_required=required)


def _output_path(args):
    return args.output_long or args.output_short


def preprocess_from_args(args):
    from .images import Preprocess

    return Preprocess(
        size=tuple(args.size) if args.size else None,
        grayscale=args.grayscale,
        scale_pixels=args.scale_pixels,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
        max_pixels=args.max_image_pixels,
    )


def _check_writable(path: Path) -> None:
    """The first folder that exists on the way to ``path`` must be a writable folder (missing
    ones are created), checked before any work."""
    from .errors import LrpcError

    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise LrpcError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LrpcError(f"{path}: cannot write in {folder}")


# -- commands --------------------------------------------------------------------------------------


def cmd_compile(args) -> int:
    from .compiler import compile_file
    from .crp import parse_features
    from .errors import LrpcError

    given = _output_path(args)
    out = Path(given) if given else Path(args.model).with_suffix(".lrp.onnx")
    if out.is_dir():
        raise LrpcError(f"{out}: is a directory; give a file name with -o")
    if (args.crp_layer is None) != (args.features is None):
        raise LrpcError("--crp-layer and --features go together")
    method = _method_from_args(args)  # a typo in it first, then the place, then the work
    composite = _composite_from_args(args)
    _check_writable(out)
    model = compile_file(
        args.model, out, composite, method=method,
        max_constant_bytes=args.max_constant_bytes,
        input_name=args.input_name, output_name=args.output_name, input_shape=args.input_shape,
        normalize_output_relevance=not args.no_normalize_output_relevance,
        skip_checks=args.skip_checks,
        external_data=True if args.external_data else None,
        relevance_at=args.relevance_at or (),
        crp_layer=args.crp_layer,
        features=parse_features(args.features) if args.features is not None else None,
        position=args.position,
        split_layernorm=args.split_layernorm,
        report=args.report,
        labels=args.labels,
        target_input=args.target_input,
        targets=args.top_classes,
        relevance_dtype=args.relevance_dtype,
    )
    if not args.quiet:
        import onnx

        extras = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
        print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB); outputs: {', '.join(extras)}")
    return 0


def cmd_check(args) -> int:
    from .check import not_a_network
    from .compiler import analyze_model

    analysis = analyze_model(args.model, input_name=args.input_name, output_name=args.output_name,
                             skip_checks=True, max_constant_bytes=args.max_constant_bytes,
                             input_shape=args.input_shape, method=_method_from_args(args))
    report = analysis.report
    if not_a_network(report):
        print(f"lrpc: error: {not_a_network(report)}", file=sys.stderr)
        return EXIT_USAGE
    _print_table(report.table())
    if report.ok:
        print(f"model check passed: {len(analysis.table.layers)} layers")
        return 0
    print(f"lrpc: error: model check failed: {len(report.failures)} unsupported node(s)", file=sys.stderr)
    return EXIT_USAGE


def cmd_inspect(args) -> int:
    from .compiler import analyze_model
    from .inspection import layer_table

    method = _method_from_args(args)
    analysis = analyze_model(args.model, _composite_from_args(args), input_name=args.input_name,
                             output_name=args.output_name, skip_checks=args.skip_checks, position=args.position,
                             split_layernorm=args.split_layernorm, max_constant_bytes=args.max_constant_bytes,
                             input_shape=args.input_shape, method=method)
    if method is not None:
        print(f"method: {method!r} (every layer and activation: its exact derivative)")
    _print_table(layer_table(analysis, with_rules=True))
    return 0


def _analyzer(args):
    from .runtime import LRP

    method = _method_from_args(args)
    return LRP(args.model, _composite_from_args(args), method=method, input_name=args.input_name,
               output_name=args.output_name, skip_checks=args.skip_checks,
               normalize_output_relevance=not args.no_normalize_output_relevance,
               position=args.position, split_layernorm=args.split_layernorm,
               max_constant_bytes=args.max_constant_bytes, relevance_at=args.relevance_at or (),
               report=args.report, targets=getattr(args, "top_classes", None) or 1, providers=args.providers,
               threads=args.threads, input_shape=args.input_shape)


def cmd_export(args) -> int:
    from .triton_repo import export_triton

    folder = export_triton(args.model, args.repository, name=args.model_name, max_batch_size=args.max_batch_size,
                           queue_delay_us=args.queue_delay_us, gpu=args.gpu, instances=args.instances)
    if not args.quiet:
        print(f"wrote {folder / 'config.pbtxt'} and {folder / '1' / 'model.onnx'}")
    return 0


def cmd_explain_dataset(args) -> int:
    from .dataset import explain_dataset
    from .errors import LrpcError

    out = _output_path(args)
    if not out:
        raise LrpcError("give the output folder with -o/--output")
    result = explain_dataset(args.model, args.inputs, out, _composite_from_args(args), scheduler=args.scheduler,
                             workers=args.workers, shard_size=args.shard_size, batch_size=args.batch_size,
                             threads=args.threads, preprocess=preprocess_from_args(args), layout=args.layout,
                             progress=not args.quiet)
    if not args.quiet:
        print(f"explained {result.samples} sample(s) in {result.shards} shard(s), {result.seconds:.1f} s: "
              f"{result.folder}")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeOptions, serve

    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, model_name=args.model_name,
                           max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                           providers=args.providers, threads=args.threads, ready_file=args.ready_file)
    return serve(args.model, options)


def cmd_explain(args) -> int:
    from .errors import LrpcError
    from .explain import run_command

    if not _output_path(args):
        raise LrpcError("give the output folder with -o/--output")
    args.output_dir = _output_path(args)
    return run_command(args, _analyzer)


# -- argument types -------------------------------------------------------------------------------


def _shape(text: str) -> list[int | None]:
    """``1,1,64,160``; ``?`` (or a name such as ``N``, or -1) keeps an axis dynamic."""
    dims = []
    for part in (p.strip() for p in text.split(",")):
        if part == "?" or part.isidentifier():
            dims.append(None)
            continue
        try:
            dims.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a shape: {text!r} (give integers, e.g. 1,1,64,160; ? or a name "
                                             "keeps an axis dynamic)") from None
    return dims


def _byte_size(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    stripped = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (stripped[:-1], stripped[-1]) if stripped and stripped[-1] in units else (stripped, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (give bytes, or 512K, 64M, 2G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _scale(text: str) -> int:
    value = _positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"at most 64, got {value}")
    return value


def _whole_number(low: int, high: int | None = None):
    """An argparse type: an integer of at least ``low`` (and at most ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"must lie in {low}..{high}" if high is not None else f"must be at least {low}"
            raise argparse.ArgumentTypeError(f"{bound}, got {value}")
        return value

    return parse


_port = _whole_number(0, 65535)
_non_negative_int = _whole_number(0)
_positive_int = _whole_number(1)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"give a fraction such as 0.05, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with lrpc's error convention: one line on stderr, exit code 2 (``-h`` shows usage)."""

    def error(self, message):
        where = self.prog.removeprefix("lrpc").strip()
        self.exit(EXIT_USAGE, f"lrpc: error: {where + ': ' if where else ''}{message} (see lrpc {where} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .heatmap import RANGESCALES, REDUCTIONS
    from .report import DEFAULT_THRESHOLD

    parser = _Parser(prog="lrpc", description="LRP attribution compiler for ONNX models")
    parser.add_argument("--version", action="version", version=f"lrpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own warnings (onnxruntime, onnx-graphsurgeon) and, for "
                             "explain, a line per sample")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compile", help="write MODEL.lrp.onnx: the model's outputs plus 'relevance'")
    _add_model_options(p)
    _add_output(p, "the compiled file (default: MODEL.lrp.onnx beside the model)")
    p.add_argument("--no-normalize-output-relevance", action="store_true",
                   help="start from the explained logit instead of 1")
    p.add_argument("--external-data", action="store_true",
                   help="write the weights (tensors of 1 KiB or more) to OUT.<hash>.data beside the model "
                        "(automatic near 2 GiB)")
    p.add_argument("--relevance-at", nargs="+", metavar="LAYER",
                   help="also output the relevance at these layers (index or node name) or tensors")
    p.add_argument("--crp-layer", metavar="LAYER", help="Concept Relevance Propagation at this layer's output")
    p.add_argument("--features", metavar="SPEC", help="CRP features: top:N (per input) or indices such as 1,2,10")
    p.add_argument("--report", action="store_true",
                   help="also output per-layer relevance sums (lrp_report) for a conservation report")
    p.add_argument("--relevance-dtype", choices=("float32", "float16"), default=None,
                   help="precision of the relevance pass of a quantized or half-precision model (default float32; "
                        "relevance then has the explained input's dtype)")
    p.add_argument("--targets", dest="top_classes", type=_positive_int, default=1, metavar="K",
                   help="explain K classes per sample in one call: lrp_target [N, K] (default each sample's top K), "
                        "relevance [K*N, ...], target-major; the forward pass and the denominators run once")
    p.add_argument("--target-input", choices=("optional", "required"), default="optional",
                   help="lrp_target as an input with a default, the arg-max (optional, the default) or as a plain "
                        "input that every runtime and server lists (required)")
    p.add_argument("--labels", action="store_true",
                   help="also output the class each row explains (lrp_class) and its logit (lrp_logit)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when all goes well")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("check", help="the model check table; exit 2 when something is unsupported")
    _add_model_options(p, composite=False)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("inspect", help="layer indices and the rule each layer gets")
    _add_model_options(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("explain", help="explain .npy arrays and PNG/JPEG images: heatmaps, relevance.npz, "
                                       "summary.json")
    _add_model_options(p)
    p.add_argument("inputs", nargs="+",
                   help=".npy files (one sample or a batch [N, ...]), .png/.jpg/.jpeg images, or folders of them")
    _add_output(p, "the output folder (new, empty, or an earlier output of explain)", required=True)
    p.add_argument("--target", metavar="K[,K...]",
                   help="class(es) to explain for every sample, e.g. 3 or 3,4 (default: the prediction; "
                        "negative: the prediction)")
    p.add_argument("--targets", dest="top_classes", type=_positive_int, metavar="K",
                   help="explain each sample's K highest-scoring classes in one call (a heatmap per class)")
    p.add_argument("--region", metavar="FILE",
                   help="dense outputs [N, K, H, W]: where the class counts, a .npy of weights or a PNG mask")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="samples per inference call (default 32)")
    p.add_argument("--no-normalize-output-relevance", action="store_true",
                   help="start from the explained logit instead of 1")
    p.add_argument("--relevance-at", nargs="+", metavar="LAYER",
                   help="also save the relevance at these layers (index or node name) in relevance.npz")
    p.add_argument("--strict", action="store_true",
                   help="stop at a sample with NaN/infinite values or relevance (default: skip it, listed in "
                        "summary.json)")
    p.add_argument("--feed", action="append", metavar="NAME=FILE.npy",
                   help="a value for another model input (attention_mask, ...), one row per sample; repeatable")
    p.add_argument("--providers", metavar="LIST",
                   help="onnxruntime execution providers in order, e.g. cuda,cpu (default: CUDA when present, "
                        "else CPU; a missing one falls back to the CPU with a warning)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="onnxruntime's intra-op threads")
    p.add_argument("--report", action="store_true",
                   help="print and write report.json: relevance per layer, flagging layers that lose or create it")
    p.add_argument("--report-threshold", type=_fraction, default=DEFAULT_THRESHOLD, metavar="F",
                   help=f"flag layers losing or creating more than this fraction (default {DEFAULT_THRESHOLD})")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when all goes well")
    t = p.add_argument_group("text (token-id inputs: one HTML text heatmap per sample)")
    t.add_argument("--tokens", metavar="FILE.json", help="token strings: a JSON list, or one list per sample")
    t.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizers file (tokenizer.json, or a model folder holding one) to show ids as tokens")
    t.add_argument("--feature-names", metavar="NAMES",
                   help="tabular inputs [N, F]: feature names, comma-separated or a file (one per line, or a JSON "
                        "list); default: the model's feature_names metadata")
    _add_image_options(p)
    h = p.add_argument_group("heatmaps")
    h.add_argument("--no-heatmaps", action="store_true", help="write relevance.npz and summary.json only")
    h.add_argument("--overview", action="store_true",
                   help=f"also write overview.png: the first {32} inputs beside their heatmaps")
    h.add_argument("--heatmap-scale", "--scale", dest="heatmap_scale", type=_scale, default=1,
                   help="upscale heatmap PNGs by this factor, at most 64 (default 1: the input's pixel size)")
    h.add_argument("--reduce", choices=REDUCTIONS, default=None,
                   help="over channels (default: sum; a gradient's sensitivity map: norm)")
    h.add_argument("--rangescale", choices=RANGESCALES, default=None,
                   help="default: centered (sensitivity maps and CAMs: extrema)")
    h.add_argument("--colormap", default=None,
                   help="any matplotlib colormap name (default: bwr; sensitivity maps: gray; CAMs: jet)")
    h.add_argument("--overlay", action="store_true", help="blend the heatmap over the input image")
    h.add_argument("--alpha", type=float, default=0.5, help="the heatmap's weight in --overlay (default 0.5)")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("serve", help="serve a compiled file over KServe v2 (HTTP and gRPC) with Triton; "
                                     "needs the serve extra")
    p.add_argument("model", help="a file lrpc compile wrote")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                                                         "only)")
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        p.add_argument(f"--{name}-port", type=_port, default=port, metavar="N",
                       help=f"{name} port (default {port}; 0: any free port)")
    p.add_argument("--model-name", default="lrpc", help="the name clients ask for (default lrpc)")
    p.add_argument("--max-batch-size", type=_positive_int, default=64, metavar="N",
                   help="rows per merged batch (default 64)")
    p.add_argument("--queue-delay-us", type=_non_negative_int, default=2000, metavar="US",
                   help="how long a batch waits for more requests, in microseconds (default 2000)")
    p.add_argument("--providers", metavar="LIST", help="onnxruntime execution providers in order, e.g. cuda,cpu")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="onnxruntime's intra-op threads")
    p.add_argument("--ready-file", metavar="PATH", help="once serving, write the ports and PID there as JSON")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("explain-dataset", help="explain a dataset on a Dask cluster: relevance shards and index.json")
    p.add_argument("model", help="ONNX model file (plain or compiled)")
    p.add_argument("inputs", nargs="+", help=".npy files, images, or folders of them")
    _add_output(p, "the output folder: shard_NNNNN.npz (relevance, output, target), index.json, model.lrp.onnx")
    p.add_argument("--composite", "-c", help="preset or expression (default: EpsilonPlusFlat)")
    p.add_argument("--rules", metavar="FILE.toml", help="TOML rules file (see README)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: start a local cluster on "
                        "127.0.0.1)")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="local cluster workers (default 2)")
    p.add_argument("--shard-size", type=_positive_int, default=1024, metavar="N", help="samples per shard (default 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="samples per call (default 32)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="onnxruntime's intra-op threads per worker (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    _add_image_options(p)
    p.set_defaults(run=cmd_explain_dataset)

    p = sub.add_parser("export", help="write a compiled file as a model repository entry for an inference server")
    p.add_argument("format", choices=("triton",), help="triton: REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx "
                                                        "for Triton's onnxruntime backend")
    p.add_argument("model", help="a file lrpc compile wrote")
    p.add_argument("repository", help="the model repository folder (created if missing)")
    p.add_argument("--model-name", default="lrpc", help="the model's folder and name (default lrpc)")
    p.add_argument("--max-batch-size", type=_positive_int, default=64, metavar="N",
                   help="rows per merged batch (default 64)")
    p.add_argument("--queue-delay-us", type=_non_negative_int, default=2000, metavar="US",
                   help="how long a batch waits for more requests, in microseconds (default 2000)")
    p.add_argument("--gpu", action="store_true", help="run the instances on GPUs (KIND_GPU; default KIND_CPU)")
    p.add_argument("--instances", type=_positive_int, default=1, metavar="N", help="instances per device (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when all goes well")
    p.set_defaults(run=cmd_export)
    return parser


# -- main -----------------------------------------------------------------------------------------


def _quiet_libraries(verbose: bool) -> None:
    """Only lrpc's own lines reach the user, unless ``--verbose``."""
    import onnx_graphsurgeon as gs
    import onnxruntime

    from . import graph  # noqa: F401  (it sets the quiet defaults on import: set them after)

    onnxruntime.set_default_logger_severity(2 if verbose else 3)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.WARNING if verbose else gs.logger.G_LOGGER.ERROR
    if not verbose:
        warnings.filterwarnings("ignore", module="onnx_graphsurgeon")
        warnings.filterwarnings("ignore", module="onnxruntime")


def main(argv: list[str] | None = None) -> int:
    from .errors import LrpcError, UnsupportedModelError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # -h, --version (0) or a usage error already printed (2)
        return int(exc.code or 0)
    from . import files  # after the arguments: `lrpc -h` loads neither onnx nor networkx
    from .registry import REGISTRY
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    registry = dict(REGISTRY)
    already_written = len(files.WRITTEN)
    try:
        _quiet_libraries(args.verbose)
        _tensor_names(args)
        _register_ops(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = args.run(args)
        _report_warnings(caught)
        return code
    except UnsupportedModelError as exc:
        if exc.report is not None:
            _print_table(exc.report.table(only_failures=True))
            n = len(exc.report.failures)
            if exc.report.exact:
                print(f"lrpc: error: gradient model check failed: {n} node(s) without an exact derivative "
                      "(register one in Python: lrpc.register_activation(op, derivative)) or use --skip-checks",
                      file=sys.stderr)
            else:
                print(f"lrpc: error: model check failed: {n} unsupported node(s); register them "
                      "(--treat-as-activation, --pass-through) or use --skip-checks", file=sys.stderr)
        else:
            print(f"lrpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LrpcError as exc:
        print(f"lrpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Interrupted
        return _interrupted(exc, already_written)
    except OSError as exc:  # the disk, not lrpc: full, read-only, vanished
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lrpc: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line, unless debugging
        interrupt = _interrupt_behind(exc)
        if interrupt is not None:  # the signal came during an import, which wrapped it in an ImportError
            return _interrupted(interrupt, already_written)
        if os.environ.get("LRPC_DEBUG"):
            raise
        print(f"lrpc: internal error: {type(exc).__name__}: {exc} (set LRPC_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        REGISTRY.clear()
        REGISTRY.update(registry)  # --treat-as-activation / --pass-through last for one command
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report_warnings(caught) -> None:
    """lrpc's own warnings (a provider missing, ...) as one line each."""
    from .runtime.session import ProviderWarning

    for w in caught:
        if issubclass(w.category, ProviderWarning):
            _warn(str(w.message))


def _interrupted(exc: KeyboardInterrupt, already_written: int) -> int:
    """One line saying what the interruption left behind; the shell's exit code for it."""
    from . import files

    reason, signum = (exc.reason, exc.signum) if isinstance(exc, Interrupted) else ("interrupted", signal.SIGINT)
    written = files.WRITTEN[already_written:]
    print(f"lrpc: {reason}; " + (f"{written[-1]} had already been written" if written else "nothing was written"),
          file=sys.stderr)
    return 128 + signum


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an exception was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and temp-file cleanup runs."""

    def __init__(self, signum: int, reason: str):
        super().__init__(reason)
        self.signum, self.reason = signum, reason


def _terminate(signum, frame):
    raise Interrupted(signum, "terminated")


if __name__ == "__main__":
    sys.exit(main())
