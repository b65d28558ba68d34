"""Pooling: MaxPool, AveragePool, GlobalAveragePool, ReduceMean."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph import constant_value, static_shape
from ..spec import Kind, OpSpec, first_input_only, int_list, text_attr
from ..symbolic import Emitter, Sym
from .windows import ones_like_spatial, transposed_window


def reshape_back(em: Emitter, layer, s: Sym, k: int = 0) -> Sym:
    return em.sym(em.op("Reshape", [s, em.shape_of(layer.act(k))], dtype=em.dtype))


#: windows up to 7x7 are routed offset by offset (about ten nodes each); larger ones (the
#: odd 60x80 test window) would make tens of thousands of nodes and take the scatter route
MAX_UNROLLED_WINDOW = 49


def _maxpool_vjp(em, layer, inputs, params, s):
    """Winner takes all: each window's ``s`` goes to its first maximal input (in scan order,
    as torch's and onnxruntime's arg-max pick it); overlapping windows add up.

    Written with standard ops only, no ``Indices`` output (which sends OpenVINO to a slow
    reference kernel): for each offset in the window, the input read there (a strided
    slice of the padded input) is compared with the window's maximum; the first offset
    that matches wins, and the shares are woven back in place (:func:`_interleave`).
    Dynamic spatial sizes and very large windows take the scatter route below."""
    routed = _route_to_first_maximum(em, layer, inputs[0], s)
    if routed is not None:
        return [routed]
    return _maxpool_scatter_vjp(em, layer, inputs, s)


def _route_to_first_maximum(em, layer, a: Sym, s: Sym):
    node = layer.node
    in_shape, out_shape = static_shape(layer.act()), static_shape(layer.output)
    if a.value is not layer.act() or in_shape is None or out_shape is None or None in in_shape[1:] \
            or None in out_shape[1:] or text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    kernel = list(node.attrs["kernel_shape"])
    if int(np.prod(kernel)) > MAX_UNROLLED_WINDOW:
        return None
    n = len(kernel)
    strides = int_list(node, "strides", [1] * n)
    dilations = int_list(node, "dilations", [1] * n)
    pads = int_list(node, "pads", [0] * (2 * n))
    spatial, pooled = list(in_shape[2:]), list(out_shape[2:])
    # pad with the lowest value (a pad never wins) far enough for every window, ceil_mode too
    reach = [(o - 1) * st + (k - 1) * d + 1 for o, st, k, d in zip(pooled, strides, kernel, dilations)]
    end_pads = [max(r - pads[i] - size, pads[n + i]) for i, (r, size) in enumerate(zip(reach, spatial))]
    lowest = em.const(np.finfo(em.dtype).min)
    padded = em.op("Pad", [a, em.ints([0, 0, *pads[:n], 0, 0, *end_pads]), lowest], {"mode": "constant"},
                   dtype=em.dtype)
    m = layer.output
    taken, shares = None, {}
    for offset in np.ndindex(*kernel):
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [b + (p - 1) * st + 1 for b, p, st in zip(starts, pooled, strides)]
        seen = em.op("Slice", [padded, em.ints(starts), em.ints(ends), em.ints(range(2, 2 + n)), em.ints(strides)],
                     dtype=em.dtype)
        hit = em.op("Equal", [seen, m], dtype=np.bool_)
        first = hit if taken is None else em.op("And", [hit, em.op("Not", [taken], dtype=np.bool_)], dtype=np.bool_)
        taken = hit if taken is None else em.op("Or", [taken, hit], dtype=np.bool_)
        share = em.cast(first, em.dtype)
        shares[tuple(starts)] = (s * em.sym(share, nonneg=True)).value
    placed, length = _interleave(em, shares, strides, pooled)
    need = [p + size for p, size in zip(pads, spatial)]
    if any(g < w for g, w in zip(length, need)):  # trailing inputs no window reads
        short = [max(w - g, 0) for g, w in zip(length, need)]
        placed = em.op("Pad", [placed, em.ints([0] * (2 + n) + [0, 0, *short])], {"mode": "constant"}, dtype=em.dtype)
    return em.sym(em.op("Slice", [placed, em.ints(pads[:n]), em.ints(need), em.ints(range(2, 2 + n))],
                        dtype=em.dtype))


def _interleave(em, shares: dict, strides, pooled):
    """Put each offset's share ``[N, C, *pooled]`` back at positions ``start + o * stride``
    of a zero tensor; returns it and its spatial length.

    A start splits into a shift ``q`` on the pooled grid and a phase ``r < stride``
    (``start = q * stride + r``): shares of one phase are shifted (a Pad on the small
    pooled grid) and summed, and the phases are woven together by one Transpose
    (depth-to-space). Data movement only, which every runtime runs alike: a grouped
    ConvTranspose is misread by the ONNX reference evaluator, and per-offset zero
    insertion at full resolution is slower in onnxruntime."""
    n = len(pooled)
    shift_max = [max(b // st for b in (start[i] for start in shares)) for i, st in enumerate(strides)]
    phases: dict[tuple, list] = {}
    for start, share in shares.items():
        q = [b // st for b, st in zip(start, strides)]
        if any(q) or any(shift_max):
            share = em.op("Pad", [share, em.ints([0, 0, *q, 0, 0, *[m - v for m, v in zip(shift_max, q)]])],
                          {"mode": "constant"}, dtype=em.dtype)
        phases.setdefault(tuple(b % st for b, st in zip(start, strides)), []).append(share)
    summed = {r: (em.op("Sum", parts, dtype=em.dtype) if len(parts) > 1 else parts[0]) for r, parts in phases.items()}
    grid = [p + q for p, q in zip(pooled, shift_max)]
    length = [g * st for g, st in zip(grid, strides)]
    if all(st == 1 for st in strides):
        return summed[(0,) * n], length
    some = next(iter(summed.values()))
    zeros = None
    stacked = []
    for r in np.ndindex(*strides):
        if r not in summed and zeros is None:  # a phase no offset reaches (stride > kernel)
            zeros = em.op("ConstantOfShape", [em.op("Shape", [some], dtype=np.int64)],
                          {"value": helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(em.dtype), [1], [0])},
                          dtype=em.dtype)
        stacked.append(em.op("Unsqueeze", [summed.get(r, zeros), em.ints([2])], dtype=em.dtype))
    woven = em.op("Concat", stacked, {"axis": 2}, dtype=em.dtype)  # [N, C, prod(strides), *grid]
    woven = em.op("Reshape", [woven, em.ints([0, 0, *strides, *grid])], dtype=em.dtype)
    woven = em.op("Transpose", [woven], {"perm": [0, 1, *[a for i in range(n) for a in (2 + n + i, 2 + i)]]},
                  dtype=em.dtype)
    return em.op("Reshape", [woven, em.ints([0, 0, *length])], dtype=em.dtype), length


def _maxpool_scatter_vjp(em, layer, inputs, s):
    """The route for dynamic spatial sizes: scatter-add ``s`` onto the arg-max positions
    MaxPool's ``Indices`` output names."""
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
    return em.sym(em.cast(count, em.dtype))


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


def _reduced(em, layer, value: Sym) -> tuple[Sym, list[int]]:
    """A reduction's output-shaped ``value`` broadcast back to the input's shape."""
    rank = len(static_shape(layer.act()))
    axes = _reduce_axes(layer.node, rank)
    if not layer.node.attrs.get("keepdims", 1):
        value = em.sym(em.op("Unsqueeze", [value, em.ints(axes)], dtype=em.dtype))
    return em.sym(em.op("Expand", [value, em.shape_of(layer.act())], dtype=em.dtype)), axes


def _reduction_derivative(local):
    """The exact VJP of a reduction: ``s`` spread back over the reduced axes, times
    ``local(em, x, y_spread, axes)``, the derivative of the reduced value by each element."""

    def vjp(em, layer, inputs, params, s):
        spread, axes = _reduced(em, layer, s)
        y, _ = _reduced(em, layer, em.sym(layer.output))
        factor = local(em, em.sym(layer.act()), y, axes)
        return [spread if factor is None else spread * factor]

    return vjp


def _winners(em, x: Sym, y: Sym, axes: list[int]) -> Sym:
    """ReduceMax/ReduceMin: the elements equal to the result, ties sharing evenly (torch's amax)."""
    hit = em.sym(em.cast(em.op("Equal", [x, y], dtype=np.bool_), em.dtype), nonneg=True)
    return hit / hit.sum(axes)


def _l2(em, x: Sym, y: Sym, axes: list[int]) -> Sym:
    """``x / ‖x‖``, 0 where the norm is 0 (torch's norm backward)."""
    zero = em.op("Equal", [y, em.const(0.0)], dtype=np.bool_)
    return em.sym(em.const(0.0)).where(zero, x / (y + em.sym(em.cast(zero, em.dtype))))


def _gradient_only_reduction(op_type: str, local) -> OpSpec:
    return OpSpec(op_type, Kind.POOLING, None, linear=False, check=_reducemean_check,
                  derivative=_reduction_derivative(local), gradient_only=True)


def _rank_known(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return first_input_only(node, acts)


SPECS = [
    OpSpec("MaxPool", Kind.POOLING, _maxpool_vjp, linear=False, selects=True, check=_rank_known),
    OpSpec("AveragePool", Kind.POOLING, _avgpool_vjp, check=_rank_known),
    OpSpec("GlobalAveragePool", Kind.POOLING, _gap_vjp, check=_rank_known),
    OpSpec("ReduceMean", Kind.POOLING, _reducemean_vjp, check=_reducemean_check),
    # the statistics of normalizations written out, which LRP holds constant
    _gradient_only_reduction("ReduceSum", lambda em, x, y, axes: None),
    _gradient_only_reduction("ReduceSumSquare", lambda em, x, y, axes: x * 2.0),
    _gradient_only_reduction("ReduceL2", _l2),
    _gradient_only_reduction("ReduceMax", _winners),
    _gradient_only_reduction("ReduceMin", _winners),
]
