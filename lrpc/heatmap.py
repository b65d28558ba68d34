"""Heatmaps of relevance: red for positive, blue for negative, white for none."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import LrpcError


def _as_array(explanation) -> np.ndarray:
    val = getattr(explanation, "val", explanation)
    return np.asarray(val, dtype=np.float64)


def reduce_channels(relevance: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """[N, C, H, W] -> [N, H, W] by ``sum``, ``norm`` or ``maxabs`` over channels."""
    if relevance.ndim == 3:
        return relevance
    if relevance.ndim != 4:
        raise LrpcError(f"heatmaps need [N, C, H, W] or [N, H, W] relevance, got shape {relevance.shape}")
    if reduce == "sum":
        return relevance.sum(axis=1)
    if reduce == "norm":
        return np.linalg.norm(relevance, axis=1)
    if reduce == "maxabs":
        return np.abs(relevance).max(axis=1)
    raise LrpcError(f"unknown channel reduction {reduce!r} (sum, norm, maxabs)")


def rangescale(maps: np.ndarray, mode: str = "centered") -> np.ndarray:
    """Scale each map to [0, 1]: ``centered`` puts 0 at 0.5, ``extrema`` spans min..max."""
    out = np.empty_like(maps)
    for i, m in enumerate(maps):
        if mode == "centered":
            peak = np.abs(m).max()
            out[i] = 0.5 + (0.5 * m / peak if peak > 0 else 0.0)
        elif mode == "extrema":
            lo, hi = m.min(), m.max()
            out[i] = (m - lo) / (hi - lo) if hi > lo else 0.5
        else:
            raise LrpcError(f"unknown rangescale {mode!r} (centered, extrema)")
    return out


def heatmap(explanation, reduce: str = "sum", rangescale_mode: str = "centered", colormap: str = "bwr") -> list[np.ndarray]:
    """One RGB uint8 image [H, W, 3] per sample."""
    from matplotlib import colormaps

    try:
        cmap = colormaps[colormap]
    except KeyError:
        raise LrpcError(f"unknown colormap {colormap!r}") from None
    maps = rangescale(reduce_channels(_as_array(explanation), reduce), rangescale_mode)
    return [(cmap(m)[..., :3] * 255).round().astype(np.uint8) for m in maps]


def save_png(image: np.ndarray, path, scale: int = 1) -> Path:
    """Write an RGB image (nearest-neighbour upscaled by ``scale``) atomically."""
    from PIL import Image

    from .graph import atomic_path

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
