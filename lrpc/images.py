"""Inputs for ``lrpc explain``: .npy arrays and PNG/JPEG images, made to fit the model's input.

Reading has two steps so that a bad file fails before any inference runs: ``plan`` reads
only headers (npy shapes, image sizes) and checks every sample against the model;
``load`` then decodes one batch at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

NPY_SUFFIX = ".npy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUFFIXES = (NPY_SUFFIX, *IMAGE_SUFFIXES)
LAYOUTS = ("nchw", "nhwc")
_SUFFIX_LIST = ".npy, .png, .jpg or .jpeg"
_EXIF_ORIENTATION = 0x0112
#: images with more pixels are refused from their header (``--max-image-pixels``): an image
#: decodes to 3 bytes a pixel, whatever its file size
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def show_shape(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def _fits(shape, expected) -> bool:
    """Whether a shape matches an expected one whose named (dynamic) axes match anything."""
    return len(shape) == len(expected) and all(not isinstance(e, int) or e == s for s, e in zip(shape, expected))


# -- what the model wants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """The explained input: its shape ([N, ...], ints or axis names) and, for images, the layout
    (``nchw``, ``nhwc``, ``nhw``; None when it is no image) and channel count (None: unknown)."""

    name: str
    shape: tuple
    layout: str | None
    channels: int | None

    @property
    def sample_shape(self) -> tuple:
        return self.shape[1:]

    @property
    def spatial(self) -> tuple:
        """(H, W), each an int or None when dynamic."""
        if self.layout is None:
            return (None, None)
        h, w = self.shape[2:4] if self.layout == "nchw" else self.shape[1:3]
        return tuple(d if isinstance(d, int) else None for d in (h, w))

    def describe(self) -> str:
        return show_shape(self.shape)


def model_input(session, name: str, layout: str | None = None) -> ModelInput:
    """Read the input's shape from an onnxruntime session; infer the layout when not given:
    1 or 3 channels at axis 1 -> nchw, at the last axis -> nhwc, else nchw."""
    meta = next(i for i in session.get_inputs() if i.name == name)
    shape = tuple(meta.shape)
    if len(shape) == 3 and _is_signal(shape):
        if layout is not None:
            raise InputError(f"--layout {layout}: the model's input {show_shape(shape)} is a signal [N, C, L]")
        return ModelInput(name, shape, None, None)
    if len(shape) == 3:
        return ModelInput(name, shape, "nhw", 1)
    if len(shape) != 4:
        if layout is not None:
            raise InputError(f"--layout {layout}: the model's input {show_shape(shape)} is not an image batch")
        return ModelInput(name, shape, None, None)
    if layout is None:
        layout = "nhwc" if shape[1] not in (1, 3) and shape[3] in (1, 3) else "nchw"
    channels = shape[1] if layout == "nchw" else shape[3]
    return ModelInput(name, shape, layout, channels if isinstance(channels, int) else None)


def _is_signal(shape) -> bool:
    """``[N, C, L]`` with a few channels over a long axis (audio, time series), not an
    ``[N, H, W]`` image: C at most 8 and L unknown or above 64."""
    channels, length = shape[1], shape[2]
    return isinstance(channels, int) and channels <= 8 and (not isinstance(length, int) or length > 64)


@dataclass(frozen=True)
class Preprocess:
    """How images become model input: resize to ``size`` (H, W), read as one channel
    (``grayscale``), divide 8-bit pixels by 255 (``scale_pixels``), then ``(x - mean) / std``
    per channel. ``.npy`` inputs are fed as they are."""

    size: tuple[int, int] | None = None
    grayscale: bool = False
    scale_pixels: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def check(self) -> None:
        if self.std is not None and any(s == 0 for s in self.std):
            raise InputError("--std: a standard deviation of 0 would divide by zero")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and not all(np.isfinite(values)):
                raise InputError(f"{flag}: values must be finite numbers")


# -- the samples of a run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sample: a row of a .npy batch (``row``), a whole one-sample .npy, or an image."""

    path: Path
    shape: tuple  # as fed to the model, without the batch axis
    row: int | None = None
    image_size: tuple[int, int] | None = None  # (H, W) of the image file, after EXIF rotation

    @property
    def is_image(self) -> bool:
        return self.image_size is not None

    @property
    def name(self) -> str:
        return f"{self.path}[{self.row}]" if self.row is not None else str(self.path)


def collect(paths) -> list[Path]:
    """The input files: files as given, folders as their .npy/.png/.jpg/.jpeg files (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
            if not found:
                raise InputError(f"{p}: no {_SUFFIX_LIST} files in this folder")
            files.extend(found)
        elif not p.exists():
            raise InputError(f"{p}: no such file or folder")
        elif p.suffix.lower() not in SUFFIXES:
            kind = f"{p.suffix!r}" if p.suffix else "a file without extension"
            raise InputError(f"{p}: unknown input type {kind}; give {_SUFFIX_LIST} files or a folder")
        else:
            files.append(p)
    return files


def _open_npy(path: Path) -> np.ndarray:
    # memory-mapped: planning reads only the header, loading reads only the rows of a batch
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise InputError(f"{path}: holds {getattr(array, 'dtype', type(array).__name__)} data, not numbers")
    return array


def _plan_npy(path: Path, spec: ModelInput) -> list[Sample]:
    """A .npy holds a batch [N, ...] or one sample (the model's shape without the batch axis)."""
    shape = _open_npy(path).shape
    if len(shape) == len(spec.shape) and _fits(shape[1:], spec.sample_shape):
        if shape[0] == 0:
            raise InputError(f"{path}: an empty batch, shape {shape}")
        return [Sample(path, shape[1:], row=i) for i in range(shape[0])]
    if _fits(shape, spec.sample_shape):
        return [Sample(path, shape)]
    raise InputError(f"{path}: shape {shape} does not fit the model's input {spec.describe()} "
                     f"(give one sample {show_shape(spec.sample_shape)} or a batch)")


def _image_error(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})")


def _oriented_size(img) -> tuple[int, int]:
    """(H, W) as the image is shown: EXIF orientations 5-8 swap width and height."""
    w, h = img.size
    return (w, h) if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8) else (h, w)


def _image_channels(spec: ModelInput, prep: Preprocess) -> int:
    """Channels an image is read with: one for grayscale models or --grayscale, else RGB."""
    if spec.layout is None:
        raise InputError(f"images need a model input [N, C, H, W], [N, H, W, C] or [N, H, W]; "
                         f"this model's is {spec.describe()}")
    if spec.channels not in (None, 1, 3):
        raise InputError(f"the model's input {spec.describe()} has {spec.channels} channels; images give 1 or 3")
    return 1 if prep.grayscale or spec.channels == 1 else 3


def _image_shape(spec: ModelInput, hw: tuple[int, int], channels: int) -> tuple:
    model_channels = spec.channels or channels
    return {"nchw": (model_channels, *hw), "nhwc": (*hw, model_channels), "nhw": hw}[spec.layout]


def _plan_image(path: Path, spec: ModelInput, prep: Preprocess) -> Sample:
    from PIL import Image

    channels = _image_channels(spec, prep)
    try:
        # the header only; its size is checked against the limit just below, in lrpc's words
        with _bounded(None, path), Image.open(path) as img:
            size = _oriented_size(img)
    except InputError:
        raise
    except Exception as exc:  # Pillow raises many kinds for broken files; all mean "unreadable"
        raise _image_error(path, exc) from None
    if size[0] * size[1] > prep.max_pixels:
        raise _too_large(path, size[0] * size[1], prep.max_pixels)
    hw = prep.size or size
    want_h, want_w = spec.spatial
    if (want_h is not None and hw[0] != want_h) or (want_w is not None and hw[1] != want_w):
        got = f"resized to {hw[0]}x{hw[1]}" if prep.size else f"{hw[0]}x{hw[1]}"
        raise InputError(f"{path}: the image is {got} (H x W) but the model expects "
                         f"{want_h or '?'}x{want_w or '?'}; resize with --size {want_h or 'H'} {want_w or 'W'}")
    shape = _image_shape(spec, hw, channels)
    _check_normalization(prep, spec.channels or channels)
    return Sample(path, shape, image_size=size)


def _check_normalization(prep: Preprocess, channels: int) -> None:
    for flag, values in (("--mean", prep.mean), ("--std", prep.std)):
        if values is not None and len(values) not in (1, channels):
            allowed = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
            raise InputError(f"{flag}: give {allowed}, got {len(values)}")


def plan(paths, spec: ModelInput, prep: Preprocess) -> list[Sample]:
    """Every sample of the run, checked against the model from headers alone."""
    prep.check()
    samples = []
    for path in collect(paths):
        if path.suffix.lower() == NPY_SUFFIX:
            samples.extend(_plan_npy(path, spec))
        else:
            samples.append(_plan_image(path, spec, prep))
    # one run is one relevance array in relevance.npz: its samples must share a shape
    first = samples[0]
    for s in samples[1:]:
        if s.shape != first.shape:
            raise InputError(f"{s.name}: sample shape {s.shape} differs from {first.name}'s {first.shape}; "
                             f"one run needs one shape (resize images with --size H W)")
    return samples


# -- decoding a batch -----------------------------------------------------------------------------------


def _too_large(path: Path, pixels: int, limit: int) -> InputError:
    return InputError(f"{path}: {pixels:,} pixels, more than --max-image-pixels {limit:,}")


@contextlib.contextmanager
def _bounded(limit: int | None, path: Path):
    """Pillow's decompression-bomb guard set to lrpc's limit, its warning and error turned
    into lrpc's one-line refusal."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: too many pixels for --max-image-pixels {limit or 0:,} ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_image(path: Path, grayscale: bool, max_pixels: int, reduce_to: tuple[int, int] | None = None):
    """The decoded image as shown (EXIF rotation applied), in mode L or RGB. ``reduce_to``
    (H, W): let the decoder shrink by powers of two while staying at least that large
    (JPEG's draft mode), so a huge photo never exists at full size in memory."""
    from PIL import Image, ImageOps

    try:
        with _bounded(max_pixels, path), Image.open(path) as img:
            if reduce_to is not None:
                img.draft("L" if grayscale else "RGB", (reduce_to[1], reduce_to[0]))
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA")  # Pillow warns when a palette with transparency skips this step
            ImageOps.exif_transpose(img, in_place=True)
            mode = "L" if grayscale else "RGB"
            return img if img.mode == mode else img.convert(mode)  # a copy only when needed
    except InputError:
        raise
    except Exception as exc:  # truncated data surfaces only here, when decoding
        raise _image_error(path, exc) from None


def _image_sample(sample: Sample, spec: ModelInput, prep: Preprocess,
                  shown: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(model-ready sample, for overlays the image as shown at its own size in uint8, else None)."""
    from PIL import Image

    channels = _image_channels(spec, prep)
    # the overlay needs the full-size picture; otherwise the decoder may shrink it at once
    reduce_to = prep.size if prep.size and not shown else None
    img = _read_image(sample.path, channels == 1, prep.max_pixels, reduce_to)
    if reduce_to is None and (img.height, img.width) != sample.image_size:  # an EXIF rotation the header hid
        raise InputError(f"{sample.path}: decodes to {img.height}x{img.width} (H x W), its header says "
                         f"{sample.image_size[0]}x{sample.image_size[1]}")
    picture = np.asarray(img) if shown else None
    if prep.size and (img.height, img.width) != tuple(prep.size):
        img = img.resize((prep.size[1], prep.size[0]), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    x = x[..., None] if x.ndim == 2 else x  # [H, W, C] from here on
    if spec.channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)  # --grayscale for an RGB model: gray in every channel
    if prep.scale_pixels:
        x = x / 255.0
    if prep.mean is not None:
        x = x - np.asarray(prep.mean, dtype=np.float32)
    if prep.std is not None:
        x = x / np.asarray(prep.std, dtype=np.float32)
    x = {"nchw": lambda a: a.transpose(2, 0, 1), "nhwc": lambda a: a, "nhw": lambda a: a[..., 0]}[spec.layout](x)
    return x, picture


def load(samples: list[Sample], spec: ModelInput, prep: Preprocess, shown: bool = False):
    """A batch: (x [B, ...], the samples as images [H, W(, C)] for overlays, or None).
    npy rows are fed as they are; images are decoded and preprocessed."""
    arrays, images, opened = [], [], {}
    for s in samples:
        if s.is_image:
            x, image = _image_sample(s, spec, prep, shown)
        else:
            if s.path not in opened:
                opened[s.path] = _open_npy(s.path)
            x = np.asarray(opened[s.path][s.row] if s.row is not None else opened[s.path])
            image = np.moveaxis(x, 0, -1) if spec.layout == "nchw" else x  # as [H, W(, C)]
        arrays.append(x)
        images.append(image)
    return np.stack(arrays), (images if shown else None)
