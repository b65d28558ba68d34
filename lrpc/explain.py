"""``lrpc explain``: files in; heatmaps, ``relevance.npz``, ``summary.json`` out.

The run in four steps, each checked before the next spends time:

1. **plan**: the output folder, the flags, every input file against the model's input
   (headers only), the targets, the region;
2. **explain**: batch by batch through one onnxruntime session; samples with NaN or
   infinite values (or whose relevance overflows) are skipped and listed (``--strict``:
   an error naming the sample). Each sample yields one *item* per explained target and
   CRP feature;
3. **render**: one picture per item, by what the input is: an image heatmap (PNG), a text
   heatmap for token ids (HTML), a signal plot for 1-D inputs, a bar chart for tabular ones;
4. **write**: everything into a temporary folder moved into place at once
   (:class:`lrpc.files.OutputFolder`), then one summary line (``-v``: a line per item).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, LrpcError, TargetError

#: rank-2 inputs up to this many features are a table (bar charts); longer ones a signal
MAX_TABLE_FEATURES = 256
MAX_HEATMAP_PIXELS = 100_000_000
OVERVIEW_SAMPLES = 32


# -- plan -----------------------------------------------------------------------------------------


def parse_targets(text: str | None) -> list[int] | None:
    """``--target 3`` or ``--target 3,4``: the classes each sample is explained for; a
    negative entry means the prediction."""
    if text is None:
        return None
    try:
        targets = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise TargetError(f"--target must be class indices such as 3 or 3,4, got {text!r}") from None
    if not targets:
        raise TargetError("--target needs at least one class")
    return targets


def read_feeds(items) -> dict:
    """``--feed NAME=FILE.npy``: the model's other inputs, one row per explained sample (or
    one sample's worth, used for every sample)."""
    feeds = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--feed {item!r}: give NAME=FILE.npy")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"--feed {name}: {path} is not a readable .npy array ({exc})") from None
    return feeds


def feed_rows(feeds: dict, rows: np.ndarray, total: int) -> dict:
    return {name: value[rows] if value.ndim and value.shape[0] == total
            else np.broadcast_to(value, (len(rows), *value.shape)) for name, value in feeds.items()}


def read_region(path) -> np.ndarray | None:
    """``--region`` for dense outputs: a ``.npy`` of weights or a PNG mask (non-zero = in)."""
    if path is None:
        return None
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32)
        from PIL import Image

        with Image.open(path) as img:
            return (np.asarray(img.convert("L")) > 0).astype(np.float32)
    except Exception as exc:  # numpy and Pillow raise many kinds for unreadable files
        raise InputError(f"--region {path}: not a readable .npy array or image ({exc})") from None


def read_feature_names(value, analyzer, count: int | None) -> list[str] | None:
    """``--feature-names a,b,c`` or a file (one per line, or a JSON list), else the model's
    ``feature_names`` metadata (a JSON list or comma-separated), else None."""
    text = value
    if value is not None and Path(value).is_file():
        text = Path(value).read_text()
    elif value is None:
        text = analyzer.metadata.get("feature_names")
    if text is None:
        return None
    text = text.strip()
    try:
        names = json.loads(text) if text.startswith("[") else None
    except ValueError:
        names = None
    if names is None:
        names = [n.strip() for n in (text.splitlines() if "\n" in text else text.split(",")) if n.strip()]
    if count is not None and len(names) != count:
        raise InputError(f"--feature-names: {len(names)} name(s) for {count} features")
    return [str(n) for n in names]


# -- explain --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One explanation: a sample, for one target (and one CRP feature)."""

    index: int  # the sample's place in the run
    sample: object  # lrpc.images.Sample
    relevance: np.ndarray
    output: np.ndarray  # the model's explained output for the sample
    target: int  # the class explained (the prediction resolved)
    logit: float | None
    feature: int | None = None
    extras: dict = field(default_factory=dict)
    name: str | None = None  # the picture's file name
    picture: bytes | None = None


@dataclass
class Run:
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (index, sample, reason)
    ids: dict = field(default_factory=dict)  # sample index -> token ids (token models)
    inputs: dict = field(default_factory=dict)  # sample index -> the input (for overviews)
    report: np.ndarray | None = None  # summed [layers, 2]
    report_samples: int = 0


def _skip(run: Run, args, index: int, sample, reason: str) -> None:
    if args.strict:
        raise InputError(f"{sample.name}: {reason}")
    run.skipped.append((index, sample, reason))


def explain_all(analyzer, samples, spec, prep, args, targets, region) -> Run:
    """Every sample, batch by batch (see the module docstring). Everything stays in memory
    until the end: a failure in any batch writes nothing."""
    from contextlib import nullcontext

    from .images import load
    from .runtime.analyzer import RelevanceWarning

    run = Run()
    feeds = read_feeds(args.feed)
    starts = range(0, len(samples), args.batch_size)
    progress, task = _progress_bar(len(samples)) if len(starts) > 1 and not args.quiet else (None, None)
    batches = _prefetched(samples, starts, args.batch_size,
                          lambda batch: load(batch, spec, prep, shown=args.overlay or args.overview))
    with progress or nullcontext():
        for start, batch, (x, shown) in batches:
            keep = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.dtype.kind == "f" else np.ones(len(x), bool)
            for i in np.flatnonzero(~keep):
                _skip(run, args, start + i, batch[i], "holds NaN or infinite values")
            kept = np.flatnonzero(keep)
            extra = feed_rows(feeds, start + kept, len(samples))
            bad: set[int] = set()
            explanations = []
            for target in targets or [None]:
                if not kept.size:
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RelevanceWarning)  # reported per sample below
                    try:
                        expl = analyzer.analyze(x[kept], target, extra_inputs=extra, region=region)
                    except TargetError as exc:  # the API's words for it, in the command line's
                        raise TargetError(f"--{exc}" if str(exc).startswith("target") else str(exc)) from None
                explanations.extend(per_target(expl, len(kept)))
                rows = expl.val.reshape(len(expl.val), -1)
                finite = np.isfinite(rows).all(axis=1).reshape(-1, len(kept)).all(axis=0)  # features or targets
                bad |= {int(j) for j in np.flatnonzero(~finite)}
            for j in sorted(bad):
                _skip(run, args, start + kept[j], batch[kept[j]],
                      "its relevance is not finite (values overflow float32 inside the model)")
            good = [j for j in range(len(kept)) if j not in bad]
            for expl in explanations:
                _collect(run, analyzer, expl, good, kept, start, batch, x, shown)
            if progress:
                progress.advance(task, len(batch))
    run.items.sort(key=lambda item: item.index)  # sample-major; targets and features keep their order
    if not run.items:
        first = run.skipped[0]
        raise InputError(f"no sample could be explained ({first[2]}: {first[1].name}, ...)")
    return run


def per_target(expl, n: int) -> list:
    """An explanation of K classes per sample (rows target-major, ``[K·N, ...]``) as K
    explanations of N rows, one per class column; any other as itself."""
    from dataclasses import replace

    k = len(expl.val) // n if n else 1
    if k <= 1 or expl.extras.get("features") is not None:
        return [expl]
    rows = [slice(j * n, (j + 1) * n) for j in range(k)]
    return [replace(expl, val=expl.val[r], output_selection=expl.output_selection[r],
                    extras={name: value[r] if name == "logit" else value for name, value in expl.extras.items()})
            for r in rows]


def _prefetched(samples, starts, size: int, read):
    """``(start, batch, read(batch))`` for each batch, the next one read in a thread while
    the caller runs the current one: decoding (PIL, numpy) and onnxruntime both release the
    GIL, so reading files overlaps inference instead of adding to it. One batch ahead at
    most, so memory stays at two batches."""
    from concurrent.futures import ThreadPoolExecutor

    starts = list(starts)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrpc-read") as pool:
        ahead = pool.submit(read, samples[starts[0]:starts[0] + size]) if starts else None
        for i, start in enumerate(starts):
            current = ahead.result()
            if i + 1 < len(starts):
                ahead = pool.submit(read, samples[starts[i + 1]:starts[i + 1] + size])
            yield start, samples[start:start + size], current


def _collect(run: Run, analyzer, expl, good, kept, start, batch, x, shown) -> None:
    n = len(kept)
    features = expl.extras.get("features")  # CRP: [F, n], relevance rows features-first
    report = expl.extras.get("report")
    if report is not None:
        summed = report[good].sum(axis=0)
        run.report = summed if run.report is None else run.report + summed
        run.report_samples += len(good)
    extras = {k: v for k, v in expl.extras.items() if k.startswith("relevance_at:")}
    for j in good:
        index = start + int(kept[j])
        sample = batch[int(kept[j])]
        logit = expl.logit[j] if expl.logit is not None else None
        if analyzer.explains_tokens:
            run.ids[index] = x[int(kept[j])]
        run.inputs[index] = shown[int(kept[j])] if shown is not None else None
        rows = [(None, j)] if features is None else [(int(features[f, j]), f * n + j) for f in range(len(features))]
        for feature, row in rows:
            run.items.append(Item(index, sample, expl.val[row], expl.output[j], int(expl.output_selection[j]),
                                  None if logit is None else float(logit), feature,
                                  {k: v[j] for k, v in extras.items()}))


def _progress_bar(total: int):
    """A transient progress bar on stderr, for runs of more than one batch. Only a terminal
    shows it: in a pipe or a log it would leave a stray line behind."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    return progress, progress.add_task("explain", total=total)


# -- render ---------------------------------------------------------------------------------------


def kind_of(analyzer, spec) -> str:
    """What picture an item gets: ``text``, ``image``, ``signal``, ``table`` or ``none``."""
    if analyzer.explains_tokens:
        return "text"
    if spec.layout is not None:
        return "image"
    rank = len(spec.shape)
    if rank == 2:
        features = spec.shape[1]
        return "table" if isinstance(features, int) and features <= MAX_TABLE_FEATURES else "signal"
    if rank == 3:
        return "signal"
    return "none"


def render(run: Run, analyzer, spec, args) -> None:
    """One picture per item (``--no-heatmaps``: none), named after the sample, the target
    when several are explained and the CRP feature."""
    kind = kind_of(analyzer, spec)
    if args.no_heatmaps or kind == "none":
        return
    several_targets = len(args.targets or []) > 1 or getattr(analyzer, "targets", 1) > 1
    suffix = ".html" if kind == "text" else ".png"
    names = _names(run.items, "text" if kind == "text" else "heatmap", suffix, several_targets)
    for item, name in zip(run.items, names):
        item.name = name
    if kind == "image":
        _render_images(run, spec, args)
    elif kind == "text":
        tokens = token_strings(np.stack([run.ids[item.index] for item in run.items]), args)
        from .heatmap import text_heatmap

        for item, row in zip(run.items, tokens):
            per_token = (np.linalg.norm(item.relevance, axis=-1) if args.reduce == "norm"
                         else np.abs(item.relevance).max(axis=-1) if args.reduce == "maxabs" else item.relevance.sum(axis=-1))
            text = text_heatmap(row, per_token, colormap=args.colormap, rangescale=args.rangescale)
            item.extras["text"] = text
            item.picture = _html_page(text, item.name)
    elif kind == "signal":
        from .heatmap import signal_plot

        for item in run.items:
            signal = _sample_values(item)
            item.picture = signal_plot(signal, item.relevance, colormap=args.colormap, rangescale=args.rangescale,
                                       title=_title(item))
    elif kind == "table":
        from .heatmap import feature_bars

        names_of = read_feature_names(args.feature_names, analyzer,
                                      spec.shape[1] if isinstance(spec.shape[1], int) else None)
        for item in run.items:
            item.picture = feature_bars(item.relevance, names_of, title=_title(item))


def _sample_values(item: Item) -> np.ndarray:
    sample = item.sample
    from .images import _open_npy

    array = _open_npy(sample.path)
    return np.asarray(array[sample.row] if sample.row is not None else array, dtype=np.float64)


def _title(item: Item) -> str:
    text = f"{item.sample.name}: class {item.target}"
    return text + (f", feature {item.feature}" if item.feature is not None else "")


def _names(items, prefix: str, suffix: str, several_targets: bool) -> list[str]:
    """``heatmap_<stem>.png`` per image or one-sample .npy, ``heatmap_<index>.png`` per row of a
    .npy batch, ``_class<k>`` / ``_feature<f>`` when a sample has several items; clashes
    (a.png and a.jpg, names differing in case) get _2, _3, ..."""
    names, used = [], set()
    for item in items:
        stem = f"{item.index:03d}" if item.sample.row is not None else item.sample.path.stem
        if several_targets:
            stem += f"_class{item.target}"
        if item.feature is not None:
            stem += f"_feature{item.feature}"
        name, k = f"{prefix}_{stem}{suffix}", 2
        while name.casefold() in used:
            name, k = f"{prefix}_{stem}_{k}{suffix}", k + 1
        used.add(name.casefold())
        names.append(name)
    return names


def _render_images(run: Run, spec, args) -> None:
    """PNG bytes per item. An image resized with --size gets its heatmap resized back, so the
    heatmap's pixels are the input file's pixels."""
    from PIL import Image

    from .heatmap import blend_over, encode_png, heatmap

    pictures = heatmap(np.stack([item.relevance for item in run.items]), reduce=args.reduce,
                       rangescale=args.rangescale, colormap=args.colormap, channels_last=spec.layout == "nhwc")
    for item, image in zip(run.items, pictures):
        item.extras["heatmap"] = image
        picture = Image.fromarray(image)  # stays a Pillow image: one copy at the file's size, not several
        size = item.sample.image_size if item.sample.is_image else _spatial(spec) if args.cam else None
        if size is not None and image.shape[:2] != tuple(size):
            h, w = size  # a CAM, at its layer's resolution, is upsampled smoothly to the input's
            picture = picture.resize((w, h), Image.BILINEAR if args.cam else Image.NEAREST)
        if args.overlay:
            picture = blend_over(picture, run.inputs[item.index], args.alpha)
        item.picture = encode_png(picture, args.heatmap_scale)


def _spatial(spec):
    """The model input's (H, W) where both are fixed, else None."""
    dims = spec.shape[1:3] if spec.layout == "nhwc" else spec.shape[-2:]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def check_heatmap_size(samples, args) -> None:
    """``--heatmap-scale`` times the largest sample must stay a picture, not a memory bomb."""
    sizes = [s.image_size for s in samples if s.image_size] or \
        [tuple(d for d in s.shape if isinstance(d, int))[-2:] for s in samples]
    largest = max((int(np.prod(size)) for size in sizes if len(size) == 2), default=0)
    if largest * args.heatmap_scale**2 > MAX_HEATMAP_PIXELS:
        raise LrpcError(f"--heatmap-scale {args.heatmap_scale} makes heatmaps of {largest * args.heatmap_scale**2:,} "
                        f"pixels (at most {MAX_HEATMAP_PIXELS:,})")


def token_strings(ids: np.ndarray, args) -> list[list[str]]:
    """Token strings per sample: from ``--tokens`` (a JSON list of strings, or one list per
    sample), from ``--tokenizer`` (a ``tokenizers`` JSON file or a folder holding
    ``tokenizer.json``), else the ids themselves."""
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


def _html_page(text, title: str) -> bytes:
    import html

    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body>{text.to_html()}</body></html>\n").encode()


# -- write ----------------------------------------------------------------------------------------


def prediction(analyzer, output: np.ndarray) -> tuple[int, float]:
    """(predicted class, its score in the model's output) for one sample."""
    if analyzer.layout == "dense":
        scores = output.reshape(output.shape[0], -1).mean(axis=1)
    elif analyzer.position is not None:
        scores = output[analyzer.position]
    else:
        scores = output.reshape(-1)
    best = int(np.argmax(scores))
    return best, float(scores[best])


def write(folder: Path, run: Run, analyzer, args) -> list[dict]:
    """Pictures, relevance.npz, summary.json (and report.json, overview.png) into ``folder``."""
    summary = []
    for item in run.items:
        if item.picture is not None:
            (folder / item.name).write_bytes(item.picture)
        predicted, score = prediction(analyzer, item.output)
        entry = {"index": item.index, "input": item.sample.name, "prediction": predicted, "score": score,
                 "target": item.target, "logit": item.logit, "relevance_sum": float(item.relevance.sum()),
                 "heatmap": item.name if item.picture is not None else None}
        if item.feature is not None:
            entry["feature"] = item.feature
        summary.append(entry)
    for index, sample, reason in run.skipped:
        summary.append({"index": int(index), "input": sample.name, "skipped": reason})
    summary.sort(key=lambda entry: entry["index"])
    arrays = dict(relevance=np.stack([i.relevance for i in run.items]),
                  output=np.stack([i.output for i in run.items]),
                  target=np.array([i.target for i in run.items]),
                  logit=np.array([np.nan if i.logit is None else i.logit for i in run.items], dtype=np.float32),
                  sample=np.array([i.index for i in run.items]),
                  inputs=np.array([i.sample.name for i in run.items]))
    if any(i.feature is not None for i in run.items):
        arrays["feature"] = np.array([-1 if i.feature is None else i.feature for i in run.items])
    if analyzer.explains_tokens:
        arrays["token_relevance"] = arrays["relevance"].sum(axis=-1)
    for key in run.items[0].extras:
        if key.startswith("relevance_at:"):
            arrays[key] = np.stack([i.extras[key] for i in run.items])
    with open(folder / "relevance.npz", "wb") as fh:
        np.savez(fh, **arrays)
    # one sample per line, each by json's C encoder (indent= would use the pure-Python one,
    # most of the time of a large run on a small model)
    (folder / "summary.json").write_text("[\n" + ",\n".join(f"  {json.dumps(entry)}" for entry in summary) + "\n]\n")
    if run.report is not None:
        (folder / "report.json").write_text(json.dumps(conservation(run, analyzer, args).to_dict(), indent=2) + "\n")
    if args.overview:
        _write_overview(folder, run)
    return summary


def conservation(run: Run, analyzer, args):
    from .report import ConservationReport

    return ConservationReport.from_metadata(run.report[None], analyzer.metadata["lrpc.report"], args.report_threshold)


def _write_overview(folder: Path, run: Run) -> None:
    """overview.png: the first samples' inputs beside their heatmaps, in one picture."""
    from .heatmap import overview

    items = [i for i in run.items if "heatmap" in i.extras and run.inputs.get(i.index) is not None]
    items = items[:OVERVIEW_SAMPLES]
    if not items:
        raise LrpcError("--overview needs image inputs and heatmaps")
    pictures = [i.extras["heatmap"] for i in items]
    titles = [f"{i.sample.name.rsplit('/', 1)[-1]}: {i.target}" for i in items]
    (folder / "overview.png").write_bytes(overview([run.inputs[i.index] for i in items], pictures, titles))


def print_results(run: Run, summary: list[dict], analyzer, outdir: Path, args) -> None:
    """One line for the run (``-q``: none; ``-v``: a line per item, and text heatmaps)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if args.verbose and not args.quiet:
        texts = {id(i): i.extras.get("text") for i in run.items}
        by_index = {}
        for item in run.items:
            by_index.setdefault(item.index, []).append(item)
        for entry in summary:
            if "skipped" in entry:
                print(f"{entry['input']}: skipped, {entry['skipped']}")
        for item in run.items:
            where = f" -> {outdir / item.name}" if item.picture is not None else ""
            feature = f", feature {item.feature}" if item.feature is not None else ""
            predicted, _ = prediction(analyzer, item.output)
            print(f"{item.sample.name}: predicted {predicted}, explained {item.target}{feature}, "
                  f"sum(relevance) = {float(item.relevance.sum()):.4f}{where}")
            if texts[id(item)] is not None:
                console.print(texts[id(item)].to_terminal())
    if run.report is not None and not args.quiet:
        console.print(conservation(run, analyzer, args).table())
    if args.quiet:
        return
    samples = len({i.index for i in run.items})
    pictures = sum(i.picture is not None for i in run.items)
    skipped = f", {len(run.skipped)} skipped (see summary.json)" if run.skipped else ""
    extra = " and report.json" if run.report is not None else ""
    extra += ", overview.png" if args.overview else ""
    print(f"explained {samples} sample(s){skipped}: wrote {pictures} heatmap(s), relevance.npz, summary.json"
          f"{extra} to {outdir}")


# -- the command ----------------------------------------------------------------------------------


def run_command(args, analyzer_factory) -> int:
    """``lrpc explain`` (``analyzer_factory(args) -> LRP``: the command line's options)."""
    from .files import OutputFolder
    from .heatmap import get_colormap
    from .images import collect, model_input, plan

    outdir = Path(args.output_dir)
    folder = OutputFolder(outdir)
    # cheap checks first: a typo or an unwritable folder should not wait for inference
    folder.check()
    if args.colormap is not None:
        get_colormap(args.colormap)
    if not 0.0 <= args.alpha <= 1.0:
        raise LrpcError(f"--alpha must lie in [0, 1], got {args.alpha}")
    args.targets = parse_targets(args.target)
    if args.targets and getattr(args, "top_classes", None):
        raise InputError("give --target (chosen classes) or --targets K (the top K), not both")
    region = read_region(args.region)
    files = collect(args.inputs)
    analyzer = analyzer_factory(args)
    from .heatmap import style

    # the heatmap preset of what the file returns (LRP's relevance, a gradient, a CAM), then the options given
    chosen = style(analyzer.heatmap, reduce=args.reduce, rangescale=args.rangescale, colormap=args.colormap)
    args.reduce, args.rangescale, args.colormap = chosen["reduce"], chosen["rangescale"], chosen["colormap"]
    get_colormap(args.colormap)
    args.cam = analyzer.heatmap == "cam"
    if region is not None and analyzer.layout != "dense":
        raise InputError("--region applies to dense outputs [N, K, H, W] (segmentation, detection maps)")
    if args.report and "lrpc.report" not in analyzer.metadata:
        raise LrpcError(f"{args.model} was compiled without a report; compile with --report, or explain the "
                        "original model")
    spec = model_input(analyzer.session, analyzer.input_name, args.layout)
    from .cli import preprocess_from_args

    samples = plan(files, spec, preprocess_from_args(args))
    check_heatmap_size(samples, args)
    if args.feature_names is not None and kind_of(analyzer, spec) != "table":
        raise InputError("--feature-names applies to tabular inputs [N, features]")
    run = explain_all(analyzer, samples, spec, preprocess_from_args(args), args, args.targets, region)
    render(run, analyzer, spec, args)
    with folder as tmp:
        summary = write(tmp, run, analyzer, args)
    print_results(run, summary, analyzer, outdir, args)
    return 0
