"""``lrpc compile | check | inspect | explain``.

Bad input gets one clear line on stderr (the model-check table for unsupported ops) and
exit code 2; nothing is left half-written. Set ``LRPC_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
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
    p.add_argument("--max-constant-bytes", type=_byte_size, metavar="SIZE",
                   help="the most constant folding may materialize, e.g. 512M or 2G (default: the larger of 256M "
                        "and the model's largest weight)")
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
    composite = _composite_from_args(args)  # a typo in it first, then the place, then the work
    _check_writable(out)
    model = compile_file(
        args.model, out, composite,
        max_constant_bytes=args.max_constant_bytes,
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


def cmd_check(args) -> int:
    from .compiler import analyze_model

    analysis = analyze_model(args.model, input_name=args.input_name, output_name=args.output_name,
                             skip_checks=True, max_constant_bytes=args.max_constant_bytes)
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
                             split_layernorm=args.split_layernorm, max_constant_bytes=args.max_constant_bytes)
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
        max_pixels=args.max_image_pixels,
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

    from .heatmap import blend_over, encode_png, heatmap

    if relevance.ndim not in (3, 4):
        return [None] * len(batch)
    images = heatmap(relevance, reduce=args.reduce, rangescale=args.rangescale, colormap=args.colormap,
                     channels_last=spec.layout == "nhwc")
    pngs = []
    for i, (image, sample) in enumerate(zip(images, batch)):
        picture = Image.fromarray(image)  # stays a Pillow image: one copy at the file's size, not several
        if sample.is_image and image.shape[:2] != sample.image_size:
            h, w = sample.image_size
            picture = picture.resize((w, h), Image.NEAREST)
        if args.overlay:
            picture = blend_over(picture, shown[i], args.alpha)
        pngs.append(encode_png(picture, args.heatmap_scale))
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


@dataclass
class _Explained:
    """What a run produced: the explained samples (in order), their arrays and heatmaps, and
    the samples skipped with the reason."""

    samples: list = field(default_factory=list)
    indices: list = field(default_factory=list)  # each explained sample's place in the run
    relevance: list = field(default_factory=list)
    output: list = field(default_factory=list)
    target: list = field(default_factory=list)
    pngs: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (index, sample, reason)

    def arrays(self):
        cat = np.concatenate
        return cat(self.relevance), cat(self.output), cat(self.target), (cat(self.ids) if self.ids else None)


def _skip(result: _Explained, args, index: int, sample, reason: str) -> None:
    from .errors import InputError

    if args.strict:
        raise InputError(f"{sample.name}: {reason}")
    result.skipped.append((index, sample, reason))


def _explain_all(analyzer, samples, spec, prep, args) -> _Explained:
    """Relevance, output and target of every sample, its heatmap PNG (None for token
    models) and the token ids (token models), batch by batch. A sample with NaN or infinite
    values, or whose relevance overflows, is skipped (an error with ``--strict``).
    Everything stays in memory until the end: a failure in any batch writes nothing."""
    import warnings
    from contextlib import nullcontext

    from .errors import TargetError
    from .images import load
    from .runtime.analyzer import RelevanceWarning

    result = _Explained()
    feeds = _read_feeds(args.feed, len(samples))
    starts = range(0, len(samples), args.batch_size)
    progress, task = _progress_bar(len(samples)) if len(starts) > 1 else (None, None)
    with progress or nullcontext():
        for start in starts:
            batch = samples[start:start + args.batch_size]
            x, shown = load(batch, spec, prep, shown=args.overlay)
            extra = _feed_rows(feeds, start, start + len(batch), len(samples))
            keep = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.dtype.kind == "f" else np.ones(len(x), bool)
            for i in np.flatnonzero(~keep):
                _skip(result, args, start + i, batch[i], "holds NaN or infinite values")
            if keep.any():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RelevanceWarning)  # reported per sample below
                    try:
                        expl = analyzer.analyze(x[keep], args.target, extra_inputs={k: v[keep] for k, v in extra.items()})
                    except TargetError as exc:  # the API's words for it, in the command line's
                        raise TargetError(f"--{exc}" if str(exc).startswith("target") else str(exc)) from None
                kept = np.flatnonzero(keep)
                finite = np.isfinite(expl.val.reshape(len(kept), -1)).all(axis=1)
                for j in np.flatnonzero(~finite):
                    _skip(result, args, start + kept[j], batch[kept[j]],
                          "its relevance is not finite (values overflow float32 inside the model)")
                result.indices.extend(int(start + i) for i in kept[finite])
                _collect(result, analyzer, expl, [batch[i] for i in kept[finite]], x[kept][finite],
                         [shown[i] for i in kept[finite]] if shown else None, finite, spec, args)
            if progress:
                progress.advance(task, len(batch))
    if not result.samples:
        from .errors import InputError

        raise InputError(f"no sample could be explained ({result.skipped[0][2]}: {result.skipped[0][1].name}, ...)")
    return result


def _collect(result: _Explained, analyzer, expl, batch, x, shown, rows, spec, args) -> None:
    relevance = expl.val[rows]
    result.samples.extend(batch)
    result.relevance.append(relevance)
    result.output.append(expl.output[rows])
    result.target.append(np.asarray(expl.output_selection)[rows])
    if analyzer.explains_tokens:
        result.ids.append(x)
        result.pngs.extend([None] * len(batch))
    else:
        result.pngs.extend(_heatmap_pngs(relevance, batch, shown, spec, args))


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


def _write_explanations(outdir: Path, analyzer, result: _Explained, files, names) -> list[dict]:
    """Heatmaps (PNG, or HTML for text), relevance.npz and summary.json into ``outdir`` (the
    run's temporary folder: :class:`lrpc.files.OutputFolder` moves it into place)."""
    relevance, output, target, _ = result.arrays()
    summary = []
    for i, (index, sample, name, data) in enumerate(zip(result.indices, result.samples, names, files)):
        if data is not None:
            (outdir / name).write_bytes(data)
        summary.append({
            "index": index,
            "input": sample.name,
            "prediction": _prediction(analyzer, output[i]),
            "target": int(target[i]),
            "relevance_sum": float(relevance[i].sum()),
            "heatmap": name if data is not None else None,
        })
    for index, sample, reason in result.skipped:
        summary.append({"index": int(index), "input": sample.name, "skipped": reason})
    summary.sort(key=lambda entry: entry["index"])
    arrays = dict(relevance=relevance, output=output, target=target,
                  inputs=np.array([s.name for s in result.samples]))
    if analyzer.explains_tokens:
        arrays["token_relevance"] = relevance.sum(axis=-1)
    with open(outdir / "relevance.npz", "wb") as fh:
        np.savez(fh, **arrays)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_explain(args) -> int:
    from .errors import LrpcError
    from .files import OutputFolder
    from .heatmap import get_colormap
    from .images import collect
    from .runtime import LRP

    outdir = Path(args.output_dir)
    folder = OutputFolder(outdir)
    # cheap checks first: a typo or an unwritable folder should not wait for inference
    folder.check()
    get_colormap(args.colormap)
    if not 0.0 <= args.alpha <= 1.0:
        raise LrpcError(f"--alpha must lie in [0, 1], got {args.alpha}")
    files = collect(args.inputs)
    analyzer = LRP(args.model, _composite_from_args(args), input_name=args.input_name,
                   output_name=args.output_name, skip_checks=args.skip_checks,
                   normalize_output_relevance=not args.no_normalize_output_relevance,
                   position=args.position, split_layernorm=args.split_layernorm,
                   max_constant_bytes=args.max_constant_bytes)
    if any(p.key == "lrpc.crp" for p in analyzer.model.metadata_props):
        # one relevance row per feature and input: not one heatmap per input file
        raise LrpcError(f"{args.model} was compiled for CRP; explain a plain or LRP-compiled model "
                        "(CRP heatmaps: lrpc.CRP in Python, see examples/crp_digits.py)")
    spec, prep, samples = _read_inputs(files, analyzer, args)
    _check_heatmap_size(spec, samples, args)
    result = _explain_all(analyzer, samples, spec, prep, args)
    relevance, _, _, ids = result.arrays()
    texts = _text_heatmaps(ids, relevance, args) if ids is not None else None
    if texts is None:
        files, names = result.pngs, _heatmap_names(result.samples)
    else:
        names = _heatmap_names(result.samples, "text", ".html")
        files = [_html_page(text, name) for text, name in zip(texts, names)]
    with folder as tmp:
        summary = _write_explanations(tmp, analyzer, result, files, names)
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    text_of = dict(zip(result.indices, texts)) if texts is not None else {}
    for entry in summary:
        if "skipped" in entry:
            print(f"{entry['input']}: skipped, {entry['skipped']}")
            continue
        where = f" -> {outdir / entry['heatmap']}" if entry["heatmap"] else ""
        print(f"{entry['input']}: predicted {entry['prediction']}, explained {entry['target']}, "
              f"sum(relevance) = {entry['relevance_sum']:.4f}{where}")
        if entry["index"] in text_of:
            console.print(text_of[entry["index"]].to_terminal())
    n_maps = sum(data is not None for data in files)
    skipped = f" ({len(result.skipped)} sample(s) skipped)" if result.skipped else ""
    print(f"wrote {n_maps} heatmap(s), relevance.npz and summary.json to {outdir}{skipped}")
    return 0


MAX_HEATMAP_PIXELS = 100_000_000


def _check_heatmap_size(spec, samples, args) -> None:
    """``--heatmap-scale`` times the largest sample must stay a picture, not a memory bomb."""
    from .errors import LrpcError

    sizes = [s.image_size for s in samples if s.image_size] or \
        [tuple(d for d in s.shape if isinstance(d, int))[-2:] for s in samples]
    largest = max((int(np.prod(size)) for size in sizes if len(size) == 2), default=0)
    if largest * args.heatmap_scale**2 > MAX_HEATMAP_PIXELS:
        raise LrpcError(f"--heatmap-scale {args.heatmap_scale} makes heatmaps of {largest * args.heatmap_scale**2:,} "
                        f"pixels (at most {MAX_HEATMAP_PIXELS:,})")


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with lrpc's error convention: one line on stderr, exit code 2 (``-h`` shows usage)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"lrpc: error: {self.prog.removeprefix('lrpc ')}: {message} (see lrpc -h)\n"
                  if self.prog != "lrpc" else f"lrpc: error: {message} (see lrpc -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lrpc", description="LRP attribution compiler for ONNX models")
    parser.add_argument("--version", action="version", version=f"lrpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    from .images import DEFAULT_MAX_IMAGE_PIXELS, LAYOUTS

    p = sub.add_parser("explain", help="explain .npy arrays and PNG/JPEG images: heatmap PNGs, relevance.npz, "
                                       "summary.json")
    _add_model_options(p)
    p.add_argument("inputs", nargs="+",
                   help=".npy files (one sample or a batch [N, ...]), .png/.jpg/.jpeg images, or folders of them")
    p.add_argument("-o", dest="output_dir", required=True, help="output folder")
    p.add_argument("--target", type=int, help="class to explain (default: the prediction)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="samples per inference call (default 32)")
    p.add_argument("--no-normalize-output-relevance", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help="stop at a sample with NaN/infinite values or relevance (default: skip it, listed in "
                        "summary.json)")
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
    g.add_argument("--max-image-pixels", type=_positive_int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    h = p.add_argument_group("heatmaps")
    h.add_argument("--heatmap-scale", "--scale", dest="heatmap_scale", type=_scale, default=1,
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # -h, --version (0) or a usage error already printed (2)
        return int(exc.code or 0)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.run(args)
    except Interrupted as exc:
        print(f"lrpc: {exc.reason}; nothing was written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("lrpc: interrupted; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
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
    except OSError as exc:  # the disk, not lrpc: full, read-only, vanished
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lrpc: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: still one line, unless debugging
        if os.environ.get("LRPC_DEBUG"):
            raise
        print(f"lrpc: internal error: {type(exc).__name__}: {exc} (set LRPC_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and temp-file cleanup runs."""

    def __init__(self, signum: int, reason: str):
        super().__init__(reason)
        self.signum, self.reason = signum, reason


def _terminate(signum, frame):
    raise Interrupted(signum, "terminated")


if __name__ == "__main__":
    sys.exit(main())
