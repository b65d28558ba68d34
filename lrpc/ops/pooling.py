"""Pooling and resampling: MaxPool, AveragePool, GlobalAveragePool, ReduceMean, Resize."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph import constant_value, static_shape
from ..spec import Kind, OpSpec, first_input_only, text_attr, vjp_route
from ..symbolic import Emitter, Sym
from .windows import ones_like_spatial, transposed_window


def reshape_back(em: Emitter, layer, s: Sym, k: int = 0) -> Sym:
    return em.sym(em.op("Reshape", [s, em.shape_of(layer.act(k))], dtype=em.dtype))


def _maxpool_vjp(em, layer, inputs, params, s):
    """Winner takes all: scatter-add ``s`` onto the arg-max positions (overlaps add up)."""
    node = layer.node
    a = inputs[0]
    if a.value is layer.act():
        # The forward pass already pools this input: let it return the indices too.
        if len(node.outputs) == 1:
            node.outputs.append(gs.Variable(em.fresh("maxpool_indices"), dtype=np.int64))
        indices = node.outputs[1]
    else:
        _, indices = em.op("MaxPool", [a], node.attrs, num_outputs=2)
    flat = em.ints([-1])
    zeros = em.filled(em.shape_of(em.op("Reshape", [a, flat], dtype=em.dtype)), 0.0)
    scattered = em.op(
        "ScatterElements",
        [zeros, em.op("Reshape", [indices, flat], dtype=np.int64), em.op("Reshape", [s, flat], dtype=em.dtype)],
        {"axis": 0, "reduction": "add"},
        dtype=em.dtype,
    )
    return [reshape_back(em, layer, em.sym(scattered))]


def _fold_channels(em: Emitter, s: Sym) -> Sym:
    """[N, C, H, W] -> [N*C, 1, H, W], so one single-channel kernel serves every channel."""
    shape = em.op("Concat", [em.ints([-1, 1]), em.dims_of(s.value, 2)], {"axis": 0}, dtype=np.int64)
    return em.sym(em.op("Reshape", [s, shape], dtype=em.dtype))


def _avgpool_vjp(em, layer, inputs, params, s):
    """Each input position receives ``s / divisor`` from every window it lies in."""
    node = layer.node
    kernel = list(node.attrs["kernel_shape"])
    window = float(np.prod(kernel))
    if int(node.attrs.get("count_include_pad", 0)):
        scaled = s * (1.0 / window)
    else:
        # divisor = number of real (non-pad) inputs of each window = window * AvgPool_cip(ones)
        attrs = dict(node.attrs, count_include_pad=1)
        fraction = em.sym(em.op("AveragePool", [ones_like_spatial(em, layer)], attrs, dtype=em.dtype))
        scaled = s / (fraction * window)
    spread = transposed_window(em, layer, _fold_channels(em, scaled), em.const(np.ones((1, 1, *kernel))), kernel, 1)
    return [reshape_back(em, layer, spread)]


def _reduce_count(em: Emitter, a, axes: list[int]) -> Sym:
    dims = em.op("Gather", [em.shape_of(a), em.ints(axes)], {"axis": 0}, dtype=np.int64)
    count = em.op("ReduceProd", [dims], {"keepdims": 0}, dtype=np.int64)
    to = helper.np_dtype_to_tensor_dtype(em.dtype)
    return em.sym(em.op("Cast", [count], {"to": to}, dtype=em.dtype))


def _mean_vjp(em, layer, s, axes: list[int], keepdims: bool) -> list:
    a = layer.act()
    g = s if keepdims else em.sym(em.op("Unsqueeze", [s, em.ints(axes)], dtype=em.dtype))
    spread = em.sym(em.op("Expand", [g, em.shape_of(a)], dtype=em.dtype))
    return [spread / _reduce_count(em, a, axes)]


def _gap_vjp(em, layer, inputs, params, s):
    rank = len(static_shape(layer.act()))
    return _mean_vjp(em, layer, s, list(range(2, rank)), True)


def _reduce_axes(node: gs.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        axes = None if value is None else [int(v) for v in np.ravel(value)]
    else:
        axes = node.attrs.get("axes")
    if axes is None or len(axes) == 0:
        return None if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


def _reducemean_vjp(em, layer, inputs, params, s):
    rank = len(static_shape(layer.act()))
    return _mean_vjp(em, layer, s, _reduce_axes(layer.node, rank), bool(layer.node.attrs.get("keepdims", 1)))


def _reducemean_check(node: gs.Node, acts: list[int]) -> str | None:
    shape = static_shape(node.inputs[0])
    if shape is None:
        return "input rank is unknown"
    if _reduce_axes(node, len(shape)) is None:
        return "axes are not constant"
    return None


def _rank_known(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return first_input_only(node, acts)


# -- Resize (nearest, integer scale factors): every output copies one input -----------

# (coordinate_transformation_mode, nearest_mode) pairs under which an integer upscale
# copies each input into a whole block of outputs
_BLOCK_COPY = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil"),
}


def _resize_factors(node: gs.Node) -> list[int] | str:
    """Integer scale factor per axis, or why there is none."""
    in_shape = static_shape(node.inputs[0])
    scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    sizes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if scales is not None and scales.size:
        factors = [float(v) for v in scales]
    elif sizes is not None and in_shape is not None and None not in in_shape:
        factors = [float(o) / float(i) for o, i in zip(sizes, in_shape)]
    else:
        return "its scales are not constant"
    if any(f < 1 or f != int(f) for f in factors):
        return f"only integer upsampling factors are supported (got {factors})"
    if factors[:2] != [1.0, 1.0]:
        return "only spatial upsampling is supported"
    return [int(f) for f in factors]


def _resize_check(node: gs.Node, acts: list[int]) -> str | None:
    if acts != [0]:
        return "relevance must enter through the data input"
    if text_attr(node, "mode", "nearest") != "nearest":
        return f"only mode 'nearest' is supported (got {text_attr(node, 'mode', '')!r})"
    modes = (text_attr(node, "coordinate_transformation_mode", "half_pixel"),
             text_attr(node, "nearest_mode", "round_prefer_floor"))
    factors = _resize_factors(node)
    if isinstance(factors, str):
        return factors
    if modes not in _BLOCK_COPY and any(f > 1 for f in factors):
        return f"coordinate mode {modes[0]!r} with nearest mode {modes[1]!r} is not a block copy"
    return None


def _resize_vjp(em, layer, inputs, params, s):
    """Nearest upsampling by integer factors copies each input to a block: the VJP sums
    the block (an average pool times the block size)."""
    factors = _resize_factors(layer.node)[2:]
    block = float(np.prod(factors))
    if block == 1:
        return [s]
    pooled = em.op("AveragePool", [s], {"kernel_shape": factors, "strides": factors}, dtype=em.dtype)
    return [em.sym(pooled) * block]


SPECS = [
    OpSpec("MaxPool", Kind.POOLING, _maxpool_vjp, linear=False, selects=True, check=_rank_known),
    OpSpec("AveragePool", Kind.POOLING, _avgpool_vjp, check=_rank_known),
    OpSpec("GlobalAveragePool", Kind.POOLING, _gap_vjp, check=_rank_known),
    OpSpec("ReduceMean", Kind.POOLING, _reducemean_vjp, check=_reducemean_check),
    OpSpec("Resize", Kind.RESHAPING, _resize_vjp, route=vjp_route, check=_resize_check),
]
