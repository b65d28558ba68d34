"""Heatmaps of relevance, following VisionHeatmaps' and TextHeatmaps' conventions.

Vision: reduce the channels (``sum``, ``norm``, ``maxabs``), scale each sample's map to
[0, 1] (``centered`` puts zero relevance at 0.5, so a diverging colormap shows it white;
``extrema`` spans min..max), colour it with a matplotlib colormap (the diverging ``"bwr"``
by default: red positive, blue negative) and optionally blend it over the input.
Text: one background colour per token, as an HTML snippet or rich terminal text.
"""

from __future__ import annotations

import difflib
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LrpcError

REDUCTIONS = ("sum", "norm", "maxabs")
RANGESCALES = ("centered", "extrema")
DEFAULT_COLORMAP = "bwr"
#: XAIBase's heatmapping presets (``Explanation.heatmap``): signed relevance on a diverging
#: map centred at 0; a gradient's magnitude (its norm over channels) on a sequential map;
#: a class activation map on jet, scaled to its extrema
STYLES = {
    "attribution": {"reduce": "sum", "rangescale": "centered", "colormap": DEFAULT_COLORMAP},
    "sensitivity": {"reduce": "norm", "rangescale": "extrema", "colormap": "gray"},
    "cam": {"reduce": "sum", "rangescale": "extrema", "colormap": "jet"},
}


def style(name: str | None, **given) -> dict:
    """The preset ``name`` (default ``attribution``) with every option in ``given`` that is not None."""
    chosen = dict(STYLES.get(name or "attribution", STYLES["attribution"]))
    chosen.update({k: v for k, v in given.items() if v is not None})
    return chosen


# -- pieces ------------------------------------------------------------------------------------------


def get_colormap(colormap=DEFAULT_COLORMAP):
    """A matplotlib colormap by name (or a Colormap object, returned as is)."""
    if not isinstance(colormap, str):
        if callable(colormap):
            return colormap
        raise LrpcError(f"colormap must be a matplotlib colormap name, got {colormap!r}")
    from matplotlib import colormaps

    try:
        return colormaps[colormap]
    except KeyError:
        close = difflib.get_close_matches(colormap, list(colormaps), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. bwr, seismic, coolwarm, viridis"
        raise LrpcError(f"unknown colormap {colormap!r} ({hint})") from None


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise LrpcError(f"unknown {what} {value!r} ({', '.join(choices)})")


def _as_array(explanation) -> np.ndarray:
    """The relevance of an Explanation (or any array), as float64 without NaN/inf."""
    val = getattr(explanation, "val", explanation)
    try:
        relevance = np.asarray(val, dtype=np.float64)
    except (TypeError, ValueError):
        raise LrpcError("heatmaps need a numeric relevance array or an Explanation") from None
    # one NaN would turn a whole rangescaled map into the colormap's "bad" colour: say so instead
    if not np.isfinite(relevance).all():
        raise LrpcError("the relevance contains NaN or infinite values: no heatmap")
    return relevance


def reduce_channels(relevance: np.ndarray, reduce: str = "sum", *, channels_last: bool = False) -> np.ndarray:
    """[N, C, H, W] (or [N, H, W, C] with ``channels_last``) -> [N, H, W] by ``sum``, ``norm``
    or ``maxabs`` over the channels. [N, H, W] counts as one channel (``norm``/``maxabs``: |x|)."""
    _check_choice(reduce, REDUCTIONS, "channel reduction")
    relevance = np.asarray(relevance)
    if relevance.ndim == 3:
        relevance, axis = relevance[:, None], 1
    elif relevance.ndim == 4:
        axis = 3 if channels_last else 1
    else:
        raise LrpcError(f"heatmaps need [N, C, H, W], [N, H, W, C] or [N, H, W] relevance, got shape {relevance.shape}")
    if reduce == "sum":
        return relevance.sum(axis=axis)
    if reduce == "norm":
        return np.linalg.norm(relevance, axis=axis)
    return np.abs(relevance).max(axis=axis)


def range_scale(maps: np.ndarray, mode: str = "centered") -> np.ndarray:
    """Scale each map of [N, ...] to [0, 1]: ``centered`` maps 0 to 0.5 and the largest |value|
    to 0 or 1; ``extrema`` maps min..max to 0..1. A map of zeros (or, for ``extrema``, any
    constant map) becomes 0.5: white in bwr."""
    _check_choice(mode, RANGESCALES, "rangescale")
    maps = np.asarray(maps, dtype=np.float64)
    out = np.full_like(maps, 0.5)
    for i, m in enumerate(maps):
        if m.size == 0:
            continue
        if mode == "centered":
            peak = np.abs(m).max()
            if peak > 0:
                out[i] = 0.5 + 0.5 * m / peak
        else:
            lo, hi = m.min(), m.max()
            if hi > lo:
                out[i] = (m - lo) / (hi - lo)
    return out


def colorize(scaled: np.ndarray, colormap=DEFAULT_COLORMAP) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (a trailing axis of 3) through the colormap."""
    cmap = get_colormap(colormap)
    return (np.asarray(cmap(np.clip(scaled, 0.0, 1.0)))[..., :3] * 255).round().astype(np.uint8)


def _overlay_base(image) -> np.ndarray:
    """An input image as uint8 RGB [H, W, 3]: uint8 stays, floats already in [0, 1] are
    times 255, anything else (normalized inputs) is stretched over its own min..max."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3]  # alpha is dropped: the heatmap is opaque
    else:
        raise LrpcError(f"overlay images must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    try:
        a = a.astype(np.float32)
    except (TypeError, ValueError):
        raise LrpcError("the overlay image must be numeric") from None
    if not np.isfinite(a).all():
        raise LrpcError("the overlay image contains NaN or infinite values")
    lo, hi = a.min(), a.max()
    if not (lo >= 0 and hi <= 1):
        a = (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5)
    return (a * 255).round().astype(np.uint8)


def overlay_image(heat: np.ndarray, image, alpha: float = 0.5) -> np.ndarray:
    """Blend a uint8 RGB heatmap [H, W, 3] over ``image`` (same H×W): ``alpha`` is the heatmap's weight."""
    if not 0.0 <= alpha <= 1.0:
        raise LrpcError(f"alpha must lie in [0, 1], got {alpha}")
    from PIL import Image

    return np.asarray(blend_over(Image.fromarray(np.ascontiguousarray(heat, dtype=np.uint8)), image, alpha))


def blend_over(heat, image, alpha: float = 0.5):
    """``overlay_image`` on a Pillow heatmap, returning a Pillow image: blended in uint8 by
    Pillow, so a large picture is never copied to floats."""
    from PIL import Image

    base = _overlay_base(image)
    if base.shape[:2] != (heat.height, heat.width):
        raise LrpcError(f"the overlay image is {base.shape[0]}x{base.shape[1]} but the heatmap is "
                        f"{heat.height}x{heat.width} (H x W)")
    return Image.blend(Image.fromarray(base), heat.convert("RGB"), alpha)


def _overlay_samples(overlay, relevance: np.ndarray, channels_last: bool) -> list[np.ndarray]:
    """The overlay batch (in the relevance's layout) as one [H, W(, C)] image per sample."""
    batch = np.asarray(overlay)
    if batch.ndim == relevance.ndim - 1:
        batch = batch[None]  # one sample without its batch axis
    if batch.ndim != relevance.ndim or len(batch) != len(relevance):
        raise LrpcError(f"the overlay has shape {batch.shape}; give one image per sample in the "
                        f"relevance's layout {relevance.shape}")
    if relevance.ndim == 4 and not channels_last:
        return [np.moveaxis(sample, 0, -1) for sample in batch]  # [C, H, W] -> [H, W, C]
    return list(batch)


# -- vision --------------------------------------------------------------------------------------------


def heatmap(
    explanation,
    *,
    reduce: str | None = None,
    rangescale: str | None = None,
    colormap=None,
    overlay=None,
    alpha: float = 0.5,
    channels_last: bool = False,
) -> list[np.ndarray]:
    """One uint8 RGB image [H, W, 3] per sample, the same H×W as the relevance.

    ``explanation``: an :class:`~lrpc.Explanation` or a relevance array [N, C, H, W],
    [N, H, W, C] (``channels_last=True``) or [N, H, W]. ``reduce``: ``sum`` (default),
    ``norm`` or ``maxabs`` over channels; ``rangescale``: ``centered`` (default) or
    ``extrema``, per sample; ``colormap``: any matplotlib colormap name (default the
    diverging ``bwr``). ``overlay``: the input batch, in the relevance's layout (uint8, or
    floats), drawn under the heatmap, which gets weight ``alpha``. Options left None take
    the explanation's preset (:data:`STYLES`: an LRP explanation's ``attribution``, a
    gradient's ``sensitivity``, a ``cam``).
    """
    chosen = style(getattr(explanation, "heatmap", None), reduce=reduce, rangescale=rangescale, colormap=colormap)
    reduce, rangescale, colormap = chosen["reduce"], chosen["rangescale"], chosen["colormap"]
    relevance = _as_array(explanation)
    maps = range_scale(reduce_channels(relevance, reduce, channels_last=channels_last), rangescale)
    images = list(colorize(maps, colormap))
    if overlay is not None:
        bases = _overlay_samples(overlay, relevance, channels_last)
        images = [overlay_image(img, base, alpha) for img, base in zip(images, bases)]
    return images


def encode_png(image, scale: int = 1) -> bytes:
    """PNG bytes of an RGB image (array or PIL image), nearest-neighbour upscaled by
    ``scale`` (pixels stay sharp)."""
    from PIL import Image

    if scale < 1:
        raise LrpcError(f"the heatmap scale must be at least 1, got {scale}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path, scale: int = 1) -> Path:
    """Write an RGB image (nearest-neighbour upscaled by ``scale``) atomically."""
    from .files import atomic_path

    data = encode_png(image, scale)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


# -- text ---------------------------------------------------------------------------------------------


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _text_colour(rgb) -> str:
    """Black on light backgrounds, white on dark ones, so every token stays readable."""
    r, g, b = (int(c) / 255 for c in rgb)
    return "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "#ffffff"


@dataclass(frozen=True)
class TextHeatmap:
    """Tokens with their relevance and background colour; ``to_html()`` / ``to_terminal()``."""

    tokens: tuple[str, ...]
    relevance: np.ndarray
    colors: tuple[tuple[int, int, int], ...]

    def to_html(self) -> str:
        """A self-contained HTML snippet: one ``<span>`` per token, relevance in its title."""
        spans = (
            f'<span style="background-color:{_hex(rgb)};color:{_text_colour(rgb)}" title="{value:.4g}">'
            f"{html.escape(token)}</span>"
            for token, value, rgb in zip(self.tokens, self.relevance, self.colors)
        )
        return '<div class="lrpc-text-heatmap" style="line-height:1.8">' + " ".join(spans) + "</div>"

    def _repr_html_(self) -> str:  # Jupyter
        return self.to_html()

    def to_terminal(self):
        """rich ``Text``: each token on its background colour, separated by spaces."""
        from rich.text import Text

        text = Text()
        for i, (token, rgb) in enumerate(zip(self.tokens, self.colors)):
            if i:
                text.append(" ")
            text.append(token, style=f"{_text_colour(rgb)} on {_hex(rgb)}")
        return text

    def __rich__(self):
        return self.to_terminal()

    def __str__(self) -> str:
        return " ".join(self.tokens)


def _token_relevance(relevance, n_tokens: int) -> np.ndarray:
    """[T], [1, T] or [T, D] / [1, T, D] (embedding relevance, summed over D) -> [T]."""
    values = _as_array(relevance)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]  # a batch of one sequence of embeddings
    if values.ndim == 2:
        # [T, D]: a token's relevance is that of its embedding; [1, T]: a batch of one
        values = values.sum(axis=1) if values.shape[0] == n_tokens else values[0] if values.shape[0] == 1 else values
    if values.ndim != 1:
        raise LrpcError(f"text heatmaps need one relevance value per token, got shape {values.shape}")
    if values.size != n_tokens:
        raise LrpcError(f"{n_tokens} token(s) but {values.size} relevance value(s)")
    return values


def text_heatmap(tokens, relevance, *, colormap=DEFAULT_COLORMAP, rangescale: str = "centered") -> TextHeatmap:
    """Colour each token by its relevance (an array, or an Explanation of one sequence)."""
    if isinstance(tokens, str):
        raise LrpcError("tokens must be a list of strings, not one string: split it first")
    tokens = tuple(str(t) for t in tokens)
    values = _token_relevance(relevance, len(tokens))
    colors = colorize(range_scale(values[None], rangescale)[0], colormap) if tokens else np.zeros((0, 3))
    return TextHeatmap(tokens, values, tuple(tuple(int(c) for c in rgb) for rgb in colors))


# -- signals, tables and overviews (matplotlib figures) -------------------------------------------


def _figure_png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def signal_plot(signal, relevance, *, colormap=DEFAULT_COLORMAP, rangescale: str = "centered",
                title: str | None = None) -> bytes:
    """PNG of a 1-D input (audio, a time series): ``[L]`` or ``[C, L]`` (channels one above
    the other), each point coloured by its relevance (red positive, blue negative by default)."""
    from matplotlib.collections import LineCollection

    _check_choice(rangescale, RANGESCALES, "rangescale")
    x = np.asarray(signal, dtype=np.float64)
    r = np.asarray(relevance, dtype=np.float64)
    x, r = (x[None], r[None]) if x.ndim == 1 else (x, r)
    if x.shape != r.shape or x.ndim != 2:
        raise LrpcError(f"a signal plot needs a signal and relevance of one shape [L] or [C, L], got {x.shape}, {r.shape}")
    colors = colorize(range_scale(r[None], rangescale)[0], colormap) / 255.0
    figure = _figure(10, 1.6 + 1.2 * len(x))
    axes = figure.subplots(len(x), 1, squeeze=False)[:, 0]
    t = np.arange(x.shape[1])
    for channel, ax in enumerate(axes):
        points = np.stack([t, x[channel]], axis=1)
        segments = np.stack([points[:-1], points[1:]], axis=1)
        ax.add_collection(LineCollection(segments, colors=colors[channel][:-1], linewidths=1.5))
        ax.set_xlim(0, max(len(t) - 1, 1))
        lo, hi = float(x[channel].min()), float(x[channel].max())
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))
        ax.set_ylabel(f"channel {channel}" if len(x) > 1 else "value")
    axes[-1].set_xlabel("position")
    if title:
        axes[0].set_title(title)
    return _figure_png(figure)


def feature_bars(relevance, names=None, *, top: int = 30, title: str | None = None) -> bytes:
    """PNG bar chart of a tabular sample's feature relevance, the ``top`` largest in magnitude
    (red positive, blue negative), named by ``names`` (default ``feature 0..F-1``)."""
    r = np.asarray(relevance, dtype=np.float64).reshape(-1)
    names = [f"feature {i}" for i in range(r.size)] if names is None else [str(n) for n in names]
    if len(names) != r.size:
        raise LrpcError(f"{len(names)} feature name(s) for {r.size} features")
    order = np.argsort(-np.abs(r))[:top][::-1]
    figure = _figure(7, 0.6 + 0.28 * len(order))
    ax = figure.subplots()
    ax.barh(np.arange(len(order)), r[order], color=["#c0392b" if v > 0 else "#2e86c1" for v in r[order]])
    ax.set_yticks(np.arange(len(order)), [names[i] for i in order])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("relevance")
    if title:
        ax.set_title(title)
    return _figure_png(figure)


def overview(inputs, heatmaps, titles=None, *, columns: int = 4) -> bytes:
    """PNG of a grid: each sample's input beside its heatmap (``inputs``: images as
    ``[H, W]``/``[H, W, C]``, any range; ``heatmaps``: RGB uint8), for a first look at a run."""
    n = len(heatmaps)
    if n == 0 or len(inputs) != n:
        raise LrpcError("an overview needs one input per heatmap")
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    figure = _figure(2.6 * columns, 1.45 * rows + 0.2)
    grid = figure.subplots(rows, 2 * columns, squeeze=False)
    for ax in grid.ravel():
        ax.axis("off")
    for i, (image, heat) in enumerate(zip(inputs, heatmaps)):
        ax_in, ax_heat = grid[i // columns, 2 * (i % columns)], grid[i // columns, 2 * (i % columns) + 1]
        ax_in.imshow(_overlay_base(image), interpolation="nearest")
        ax_heat.imshow(np.asarray(heat), interpolation="nearest")
        if titles:
            ax_in.set_title(str(titles[i]), fontsize=8, loc="left")
    return _figure_png(figure)
