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
        p.add_argument("--position", type=int,
                       help="sequence outputs [N, T, V] (language models): the position explained (default -1, the last)")
        p.add_argument("--split-layernorm", action="store_true",
                       help="split LayerNorm from its affine part (scale, shift) so each takes its own rule")
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
        position=args.position,
        split_layernorm=args.split_layernorm,
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
                             output_name=args.output_name, skip_checks=args.skip_checks, position=args.position,
                             split_layernorm=args.split_layernorm)
    _print_table(layer_table(analysis, with_rules=True))
    return 0


def _preprocess_from_args(args):
    from .images import Preprocess

    return Preprocess(
        size=tuple(args.size) if args.size else None,
        grayscale=args.grayscale,
        scale_pixels=args.scale_pixels,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
    )


def _read_inputs(files: list, analyzer, args):
    """The samples to explain, each checked against the model's input from file headers alone,
    so that a bad file stops the run before any inference."""
    from .images import model_input, plan

    spec = model_input(analyzer.session, analyzer.input_name, args.layout)
    prep = _preprocess_from_args(args)
    return spec, prep, plan(files, spec, prep)


def _heatmap_names(samples, prefix: str = "heatmap", suffix: str = ".png") -> list[str]:
    """heatmap_<stem>.png per image / one-sample .npy, heatmap_<index>.png per row of a .npy
    batch; clashes (a.png and a.jpg, or names differing in case) get _2, _3, ..."""
    names, used = [], set()
    for i, sample in enumerate(samples):
        stem = f"{i:03d}" if sample.row is not None else sample.path.stem
        name, k = f"{prefix}_{stem}{suffix}", 2
        while name.casefold() in used:
            name, k = f"{prefix}_{stem}_{k}{suffix}", k + 1
        used.add(name.casefold())
        names.append(name)
    return names


def _heatmap_pngs(relevance, batch, shown, spec, args) -> list:
    """PNG bytes per sample (None when the relevance is no image). An image resized with --size
    gets its heatmap resized back, so the heatmap's pixels are the input file's pixels."""
    from PIL import Image

    from .heatmap import encode_png, heatmap, overlay_image

    if relevance.ndim not in (3, 4):
        return [None] * len(batch)
    images = heatmap(relevance, reduce=args.reduce, rangescale=args.rangescale, colormap=args.colormap,
                     channels_last=spec.layout == "nhwc")
    pngs = []
    for i, (image, sample) in enumerate(zip(images, batch)):
        if sample.is_image and image.shape[:2] != sample.image_size:
            h, w = sample.image_size
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.NEAREST))
        if args.overlay:
            image = overlay_image(image, shown[i], args.alpha)
        pngs.append(encode_png(image, args.heatmap_scale))
    return pngs


def _progress_bar(total: int):
    """A transient progress bar on stderr, for runs of more than one batch. Only a terminal
    shows it: in a pipe or a log it would leave a stray line behind."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    return progress, progress.add_task("explain", total=total)


def _read_feeds(items, total: int) -> dict:
    """``--feed NAME=FILE.npy``: the model's other inputs, one row per explained sample (or
    one sample's worth, used for every sample)."""
    from .errors import InputError

    feeds = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--feed {item!r}: give NAME=FILE.npy")
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"--feed {name}: {path} is not a readable .npy array ({exc})") from None
        feeds[name] = value
    return feeds


def _feed_rows(feeds: dict, start: int, stop: int, total: int) -> dict:
    return {name: value[start:stop] if value.ndim and value.shape[0] == total
            else np.broadcast_to(value, (stop - start, *value.shape)) for name, value in feeds.items()}


def _explain_all(analyzer, samples, spec, prep, args):
    """Relevance, output and target of every sample, its heatmap PNG (None for token
    models) and the token ids (token models), batch by batch. Everything stays in memory
    until the end: a failure in any batch writes nothing."""
    from contextlib import nullcontext

    from .images import load

    relevance, output, target, pngs, ids = [], [], [], [], []
    feeds = _read_feeds(args.feed, len(samples))
    starts = range(0, len(samples), args.batch_size)
    progress, task = _progress_bar(len(samples)) if len(starts) > 1 else (None, None)
    with progress or nullcontext():
        for start in starts:
            batch = samples[start:start + args.batch_size]
            x, shown = load(batch, spec, prep, shown=args.overlay)
            extra = _feed_rows(feeds, start, start + len(batch), len(samples))
            expl = analyzer.analyze(x, args.target, extra_inputs=extra)
            relevance.append(expl.val)
            output.append(expl.output)
            target.append(np.asarray(expl.output_selection))
            if analyzer.explains_tokens:
                ids.append(x)
                pngs.extend([None] * len(batch))
            else:
                pngs.extend(_heatmap_pngs(expl.val, batch, shown, spec, args))
            if progress:
                progress.advance(task, len(batch))
    token_ids = np.concatenate(ids) if ids else None
    return np.concatenate(relevance), np.concatenate(output), np.concatenate(target), pngs, token_ids


def _token_strings(ids: np.ndarray, args) -> list[list[str]]:
    """Token strings per sample: from ``--tokens`` (a JSON list of strings, or one list per
    sample), from ``--tokenizer`` (a ``tokenizers`` JSON file or a folder holding
    ``tokenizer.json``), else the ids themselves."""
    from .errors import InputError

    if args.tokens:
        try:
            data = json.loads(Path(args.tokens).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--tokens {args.tokens}: not a readable JSON file ({exc})") from None
        rows = [data] * len(ids) if data and all(isinstance(t, str) for t in data) else data
        if not isinstance(rows, list) or len(rows) != len(ids) or not all(isinstance(r, list) for r in rows):
            raise InputError(f"--tokens: give a list of token strings, or one list per sample ({len(ids)})")
        for i, row in enumerate(rows):
            if len(row) != ids.shape[1]:
                raise InputError(f"--tokens: sample {i} has {len(row)} tokens, its ids {ids.shape[1]}")
        return [[str(t) for t in row] for row in rows]
    if args.tokenizer:
        path = Path(args.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path))
        except ImportError:
            raise InputError("--tokenizer needs the tokenizers package (pip install tokenizers)") from None
        except Exception as exc:  # tokenizers raises its own exception types for unreadable files
            raise InputError(f"--tokenizer {path}: not a readable tokenizers file ({exc})") from None
        return [[tokenizer.id_to_token(int(i)) or f"[{int(i)}]" for i in row] for row in ids]
    return [[str(int(i)) for i in row] for row in ids]


def _text_heatmaps(ids, relevance, args) -> list:
    from .heatmap import text_heatmap

    return [text_heatmap(tokens, r.sum(axis=-1), colormap=args.colormap, rangescale=args.rangescale)
            for tokens, r in zip(_token_strings(ids, args), relevance)]


def _html_page(text, title: str) -> bytes:
    import html

    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body>{text.to_html()}</body></html>\n").encode()


def _prediction(analyzer, output: np.ndarray) -> int:
    scores = output if analyzer.position is None else output[analyzer.position]
    return int(np.argmax(scores.reshape(-1)))


def _write_explanations(outdir: Path, analyzer, samples, files, names, relevance, output, target) -> list[dict]:
    """Heatmaps (PNG, or HTML for text), relevance.npz and summary.json, each written atomically."""
    from .files import atomic_path

    outdir.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, (sample, name, data) in enumerate(zip(samples, names, files)):
        if data is not None:
            with atomic_path(outdir / name) as tmp:
                Path(tmp).write_bytes(data)
        summary.append({
            "index": i,
            "input": sample.name,
            "prediction": _prediction(analyzer, output[i]),
            "target": int(target[i]),
            "relevance_sum": float(relevance[i].sum()),
            "heatmap": name if data is not None else None,
        })
    arrays = dict(relevance=relevance, output=output, target=target, inputs=np.array([s.name for s in samples]))
    if analyzer.explains_tokens:
        arrays["token_relevance"] = relevance.sum(axis=-1)
    with atomic_path(outdir / "relevance.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    with atomic_path(outdir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_explain(args) -> int:
    from .errors import LrpcError
    from .heatmap import get_colormap
    from .images import collect
    from .runtime import LRP

    outdir = Path(args.output_dir)
    if outdir.exists() and not outdir.is_dir():
        raise LrpcError(f"{outdir}: exists and is not a folder")
    # cheap checks first: a typo should not wait for the model to compile
    get_colormap(args.colormap)
    if not 0.0 <= args.alpha <= 1.0:
        raise LrpcError(f"--alpha must lie in [0, 1], got {args.alpha}")
    files = collect(args.inputs)
    analyzer = LRP(args.model, _composite_from_args(args), input_name=args.input_name,
                   output_name=args.output_name, skip_checks=args.skip_checks,
                   normalize_output_relevance=not args.no_normalize_output_relevance,
                   position=args.position, split_layernorm=args.split_layernorm)
    if any(p.key == "lrpc.crp" for p in analyzer.model.metadata_props):
        # one relevance row per feature and input: not one heatmap per input file
        raise LrpcError(f"{args.model} was compiled for CRP; explain a plain or LRP-compiled model "
                        "(CRP heatmaps: lrpc.CRP in Python, see examples/crp_digits.py)")
    spec, prep, samples = _read_inputs(files, analyzer, args)
    relevance, output, target, pngs, ids = _explain_all(analyzer, samples, spec, prep, args)
    texts = _text_heatmaps(ids, relevance, args) if ids is not None else None
    if texts is None:
        files, names = pngs, _heatmap_names(samples)
    else:
        names = _heatmap_names(samples, "text", ".html")
        files = [_html_page(text, name) for text, name in zip(texts, names)]
    summary = _write_explanations(outdir, analyzer, samples, files, names, relevance, output, target)
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for i, entry in enumerate(summary):
        where = f" -> {outdir / entry['heatmap']}" if entry["heatmap"] else ""
        print(f"{entry['input']}: predicted {entry['prediction']}, explained {entry['target']}, "
              f"sum(relevance) = {entry['relevance_sum']:.4f}{where}")
        if texts is not None:
            console.print(texts[i].to_terminal())
    n_maps = sum(data is not None for data in files)
    print(f"wrote {n_maps} heatmap(s), relevance.npz and summary.json to {outdir}")
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

    from .heatmap import RANGESCALES, REDUCTIONS
    from .images import LAYOUTS

    p = sub.add_parser("explain", help="explain .npy arrays and PNG/JPEG images: heatmap PNGs, relevance.npz, "
                                       "summary.json")
    _add_model_options(p)
    p.add_argument("inputs", nargs="+",
                   help=".npy files (one sample or a batch [N, ...]), .png/.jpg/.jpeg images, or folders of them")
    p.add_argument("-o", dest="output_dir", required=True, help="output folder")
    p.add_argument("--target", type=int, help="class to explain (default: the prediction)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="samples per inference call (default 32)")
    p.add_argument("--no-normalize-output-relevance", action="store_true")
    p.add_argument("--feed", action="append", metavar="NAME=FILE.npy",
                   help="a value for another model input (attention_mask, ...), one row per sample; repeatable")
    t = p.add_argument_group("text (token-id inputs: one HTML text heatmap per sample)")
    t.add_argument("--tokens", metavar="FILE.json", help="token strings: a JSON list, or one list per sample")
    t.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizers file (tokenizer.json, or a model folder holding one) to show ids as tokens")
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
    h = p.add_argument_group("heatmaps")
    h.add_argument("--heatmap-scale", "--scale", dest="heatmap_scale", type=_positive_int, default=1,
                   help="upscale heatmap PNGs by this factor (default 1: the input's pixel size)")
    h.add_argument("--reduce", choices=REDUCTIONS, default="sum", help="over channels (default: sum)")
    h.add_argument("--rangescale", choices=RANGESCALES, default="centered", help="default: centered")
    h.add_argument("--colormap", default="bwr", help="any matplotlib colormap name (default: bwr)")
    h.add_argument("--overlay", action="store_true", help="blend the heatmap over the input image")
    h.add_argument("--alpha", type=float, default=0.5, help="the heatmap's weight in --overlay (default 0.5)")
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
