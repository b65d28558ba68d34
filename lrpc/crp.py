"""Concept Relevance Propagation inside the compiled graph.

The relevance at a layer's output is masked to one feature (a channel of a convolution's
output, a unit of a dense one) and propagated on down. One explanation per feature and
input: the batch of ``relevance`` holds ``F × N`` rows, ordered features first, then
inputs (``[f1_x1, f1_x2, f2_x1, f2_x2, ...]``), as in RelevancePropagation.jl.

Below the concept layer every row needs the forward activations of its input, so the
compiled file runs the layers below it once more on the input tiled ``F`` times (the same
cost a framework pays to explain ``F × N`` inputs); relevance that bypasses the layer
(a residual connection around it) is not part of the concept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import validate
from .errors import LrpcError, ParameterError
from .graph import static_shape
from .symbolic import Emitter, Sym


class Features:
    """Which features of the concept layer to explain."""

    def count(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def masks(self, em: Emitter, relevance: Sym, channels: int, rank: int) -> tuple[list[Sym], object]:
        """(one mask per feature, broadcastable to the relevance; feature indices [F, N])."""
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class TopNFeatures(Features):
    """The ``n`` features with the most relevance, per input (summed over space)."""

    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", validate.integer("TopNFeatures: n", self.n, minimum=1))

    def count(self) -> int:
        return int(self.n)

    def masks(self, em, relevance, channels, rank):
        if self.n > channels:
            raise LrpcError(f"TopNFeatures({self.n}): the layer has only {channels} features")
        totals = relevance
        if rank > 2:
            totals = em.sym(em.op("ReduceSum", [relevance, em.ints(range(2, rank))], {"keepdims": 0}, dtype=em.dtype))
        _, top = em.op("TopK", [totals, em.ints([self.n])], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)
        masks = []
        for k in range(self.n):
            index = em.op("Gather", [top, em.const(k, np.int64)], {"axis": 1}, dtype=np.int64)
            onehot = em.op("OneHot", [index, em.ints([channels]), em.const([0.0, 1.0])], {"axis": -1}, dtype=em.dtype)
            shape = em.ints([-1, channels] + [1] * (rank - 2))
            masks.append(em.sym(em.op("Reshape", [onehot, shape], dtype=em.dtype)))
        indices = em.op("Transpose", [top], {"perm": [1, 0]}, dtype=np.int64)
        return masks, indices


@dataclass(frozen=True)
class IndexedFeatures(Features):
    """Given features (channel indices, from 0), the same for every input."""

    indices: tuple

    def __init__(self, *indices):
        given = indices[0] if len(indices) == 1 and not np.isscalar(indices[0]) else indices
        flat = tuple(validate.integer("IndexedFeatures: index", i, minimum=0) for i in given)
        if not flat:
            raise ParameterError("IndexedFeatures needs at least one index")
        object.__setattr__(self, "indices", flat)

    def count(self) -> int:
        return len(self.indices)

    def masks(self, em, relevance, channels, rank):
        bad = [i for i in self.indices if not 0 <= i < channels]
        if bad:
            raise LrpcError(f"IndexedFeatures{self.indices}: the layer has {channels} features (0..{channels - 1})")
        masks = []
        for i in self.indices:
            mask = np.zeros((1, channels) + (1,) * (rank - 2))
            mask[0, i] = 1.0
            masks.append(em.sym(em.const(mask)))
        batch = em.op("Shape", [relevance], {"start": 0, "end": 1}, dtype=np.int64)
        column = em.ints(self.indices)
        grid = em.op("Expand", [em.op("Unsqueeze", [column, em.ints([1])], dtype=np.int64),
                                em.op("Concat", [em.ints([len(self.indices)]), batch], {"axis": 0}, dtype=np.int64)],
                     dtype=np.int64)
        return masks, grid

    def __repr__(self) -> str:
        return f"IndexedFeatures({', '.join(map(str, self.indices))})"


def parse_features(text: str) -> Features:
    """``top:5`` or ``1,2,10`` (the CLI's ``--features``)."""
    text = text.strip()
    try:
        if text.startswith("top:"):
            return TopNFeatures(int(text[4:]))
        return IndexedFeatures(*[int(part) for part in text.split(",") if part.strip()])
    except (ValueError, ParameterError):
        raise LrpcError(f"--features must be 'top:N' or comma-separated indices such as 1,2,10, got {text!r}") from None


def mask_features(em: Emitter, relevance: Sym, tensor: gs.Tensor, features: Features) -> tuple[Sym, object]:
    """Relevance [N, C, ...] -> [F·N, C, ...] (features first) and the feature indices [F, N]."""
    shape = static_shape(tensor)
    if shape is None or len(shape) < 2 or shape[1] is None:
        raise LrpcError(f"CRP needs a layer output with a known feature axis, {tensor.name!r} has shape {shape}")
    masks, indices = features.masks(em, relevance, shape[1], len(shape))
    parts = [relevance * mask for mask in masks]
    stacked = parts[0] if len(parts) == 1 else em.sym(em.op("Concat", parts, {"axis": 0}, dtype=em.dtype))
    return stacked, indices


def tile_batch(em: Emitter, tensor: gs.Tensor, times: int):
    """The input repeated ``times`` along the batch axis, ``[x, x, ...]``."""
    rank = len(static_shape(tensor))
    return em.op("Tile", [tensor, em.ints([times] + [1] * (rank - 1))], dtype=em.dtype, hint="crp_tile")
