"""Layers with weights: Conv, ConvTranspose, Gemm; MatMul with a weight or of two activations."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import static_shape
from ..spec import Kind, OpSpec, const_slots, int_list, other_operand, text_attr
from .products import gate_slot
from .windows import transposed_window


def _constant_weights(node: gs.Node, acts: list[int]) -> str | None:
    for slot in (1, 2):
        if slot < len(node.inputs) and node.inputs[slot].name and slot in acts:
            return "its weights depend on the input (only constant weights are supported)"
    if acts != [0]:
        return "relevance must enter through the first input"
    if static_shape(node.inputs[1]) is None:
        return "the weight shape is unknown"
    return None


def _conv_vjp(em, layer, inputs, params, s):
    kernel = list(static_shape(layer.node.inputs[1])[2:])
    group = int(layer.node.attrs.get("group", 1))
    backward = _stride_one_conv_vjp(em, layer, s, params["weight"], kernel, group)
    if backward is not None:
        return [backward]
    return [transposed_window(em, layer, s, params["weight"], kernel, group)]


def _stride_one_conv_vjp(em, layer, s, weight, kernel, group):
    """For stride 1 the VJP is itself a convolution: the kernel with in/out channels
    swapped and flipped in space, padded by ``d(k-1) - p``. onnxruntime's Conv is
    1.2-1.6x faster than its ConvTranspose of the same size, and the weight rewrite is
    folded once at session start. None when the layer does not qualify."""
    node = layer.node
    n = len(kernel)
    if int_list(node, "strides", [1] * n) != [1] * n:
        return None
    dilations = int_list(node, "dilations", [1] * n)
    span = [d * (k - 1) for d, k in zip(dilations, kernel)]
    auto = text_attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = int_list(node, "pads", [0] * (2 * n))
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:  # SAME_*: with stride 1 the total padding is the kernel span, whatever the size
        small = [t // 2 for t in span]
        begin = small if auto == "SAME_UPPER" else [t - b for t, b in zip(span, small)]
        pads = begin + [t - b for t, b in zip(span, begin)]
    back = [span[i % n] - p for i, p in enumerate(pads)]
    if min(back) < 0:
        return None
    w_shape = static_shape(node.inputs[1])
    out_channels, in_per_group = w_shape[0], w_shape[1]
    grouped = em.op("Reshape", [weight, em.ints([group, out_channels // group, in_per_group, *kernel])], dtype=em.dtype)
    swapped = em.op("Transpose", [grouped], {"perm": [0, 2, 1] + list(range(3, 3 + n))}, dtype=em.dtype)
    swapped = em.op("Reshape", [swapped, em.ints([in_per_group * group, out_channels // group, *kernel])],
                    dtype=em.dtype)
    axes = list(range(2, 2 + n))
    flipped = em.op("Slice", [swapped, em.ints([-1] * n), em.ints([-(2**62)] * n), em.ints(axes), em.ints([-1] * n)],
                    dtype=em.dtype)
    attrs = {"kernel_shape": list(kernel), "dilations": dilations, "pads": back, "group": group}
    return em.sym(em.op("Conv", [s, flipped], attrs, dtype=em.dtype))


def _transpose_pads(node: gs.Node) -> list[int] | str:
    """A transposed convolution's explicit pads: given, or what ``output_shape`` or
    ``auto_pad`` make of the input's static spatial size (the ONNX definition's
    ``total_padding``, split as ``auto_pad`` says: SAME_UPPER puts the smaller half first)."""
    n = len(static_shape(node.inputs[1])) - 2
    auto = text_attr(node, "auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET" and "output_shape" not in node.attrs:
        return int_list(node, "pads", [0] * (2 * n))
    if auto == "VALID":
        return [0] * (2 * n)
    x_shape = static_shape(node.inputs[0])
    if x_shape is None or None in x_shape[2:]:
        return "output_shape / auto_pad with dynamic spatial sizes"
    strides, dilations = int_list(node, "strides", [1] * n), int_list(node, "dilations", [1] * n)
    extra = int_list(node, "output_padding", [0] * n)
    kernel = static_shape(node.inputs[1])[2:]
    spatial = x_shape[2:]
    wanted = list(node.attrs["output_shape"])[-n:] if "output_shape" in node.attrs else \
        [size * stride for size, stride in zip(spatial, strides)]
    begin, end = [], []
    for size, stride, dilation, pad, k, out in zip(spatial, strides, dilations, extra, kernel, wanted):
        total = stride * (size - 1) + pad + ((k - 1) * dilation + 1) - int(out)
        if total < 0:
            return f"an output_shape {wanted} beyond what the kernel reaches (negative padding)"
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _conv_transpose_check(node: gs.Node, acts: list[int]) -> str | None:
    problem = _constant_weights(node, acts)
    if problem:
        return problem
    pads = _transpose_pads(node)
    return pads if isinstance(pads, str) else None


def _conv_transpose_vjp(em, layer, inputs, params, s):
    """The adjoint of a transposed convolution is the convolution with the same weights
    (and its pads explicit: given, or what ``output_shape`` / ``auto_pad`` make)."""
    node = layer.node
    n = len(static_shape(node.inputs[1])) - 2
    attrs = {
        "kernel_shape": list(static_shape(node.inputs[1])[2:]),
        "strides": int_list(node, "strides", [1] * n),
        "dilations": int_list(node, "dilations", [1] * n),
        "pads": _transpose_pads(node),
        "group": int(node.attrs.get("group", 1)),
    }
    return [em.sym(em.op("Conv", [s, params["weight"]], attrs, dtype=em.dtype))]


def _gemm_vjp(em, layer, inputs, params, s):
    attrs = layer.node.attrs
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    alpha = float(attrs.get("alpha", 1.0))
    # d/dA' of alpha * A' op(B): alpha * s op(B)^T, then undo transA.
    g = em.op("Gemm", [s, params["weight"]], {"alpha": alpha, "transB": 0 if trans_b else 1}, dtype=em.dtype)
    if trans_a:
        g = em.op("Transpose", [g], {"perm": [1, 0]}, dtype=em.dtype)
    return [em.sym(g)]


def _swap_last(em, x, rank: int):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return em.op("Transpose", [x], {"perm": perm}, dtype=em.dtype)


def _sum_batch_axes(em, g, layer, slot: int):
    """Reduce ``g`` over the batch axes along which input ``slot`` was broadcast."""
    out, mine = static_shape(layer.output), static_shape(layer.node.inputs[slot])
    lead = len(out) - len(mine)
    axes = list(range(lead)) + [i + lead for i, d in enumerate(mine[:-2]) if d == 1 and out[i + lead] != 1]
    if not axes:
        return em.sym(g)
    summed = em.op("ReduceSum", [g, em.ints(axes)], {"keepdims": 1}, dtype=em.dtype)
    return em.sym(em.op("Reshape", [summed, em.shape_of(layer.node.inputs[slot])], dtype=em.dtype))


def _matmul_vjp(em, layer, inputs, params, s):
    """``z = A·B``: ``∂/∂A = s·Bᵀ``, ``∂/∂B = Aᵀ·s``, for whichever factors carry relevance
    (a constant weight on either side, or two activations: ``Q·Kᵀ``, ``A·V``)."""
    node = layer.node
    factors = layer.operands(inputs, params)
    grads = []
    for slot in layer.acts:
        other = 1 - slot
        if slot == 0 and other not in layer.acts and len(static_shape(node.inputs[other])) == 2:
            # s·Wᵀ as (W·sᵀ)ᵀ: the weight stays the left factor. OpenVINO (2026.4) turns a
            # constant right factor into a fully-connected layer and shares its repacked
            # weights between the forward MatMul and a transposed use of the same constant,
            # which then computes with the wrong orientation
            rank = len(static_shape(layer.output))
            g = _swap_last(em, em.op("MatMul", [factors[other], _swap_last(em, s, rank)], dtype=em.dtype), rank)
        else:
            swapped = _swap_last(em, factors[other], len(static_shape(node.inputs[other])))
            g = em.op("MatMul", [s, swapped] if slot == 0 else [swapped, s], dtype=em.dtype)
        grads.append(_sum_batch_axes(em, g, layer, slot))
    return grads


def _matmul_check(node: gs.Node, acts: list[int]) -> str | None:
    shapes = [static_shape(t) for t in node.inputs]
    if any(shape is None for shape in shapes) or static_shape(node.outputs[0]) is None:
        return "operand ranks are unknown"
    if any(len(shape) < 2 for shape in shapes):
        return "a 1-D operand (matrix-vector product) is not supported"
    return None


_WEIGHT_BIAS = const_slots((1, "weight"), (2, "bias"))

SPECS = [
    OpSpec("Conv", Kind.LINEAR, _conv_vjp, params=_WEIGHT_BIAS, check=_constant_weights),
    OpSpec("ConvTranspose", Kind.LINEAR, _conv_transpose_vjp, params=_WEIGHT_BIAS, check=_conv_transpose_check),
    OpSpec("Gemm", Kind.LINEAR, _gemm_vjp, params=_WEIGHT_BIAS, check=_constant_weights),
    OpSpec("MatMul", Kind.LINEAR, _matmul_vjp, params=other_operand("weight"), check=_matmul_check,
           multilinear=True, gate=gate_slot),
]
