"""Layers with weights: Conv, ConvTranspose, Gemm, MatMul with a constant operand."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import constant_value, static_shape
from ..spec import Kind, OpSpec, const_slots, int_list, other_operand, text_attr
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
    return [transposed_window(em, layer, s, params["weight"], kernel, int(layer.node.attrs.get("group", 1)))]


def _conv_transpose_check(node: gs.Node, acts: list[int]) -> str | None:
    problem = _constant_weights(node, acts)
    if problem:
        return problem
    if text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in node.attrs:
        return "auto_pad / output_shape are not supported; export with explicit pads"
    return None


def _conv_transpose_vjp(em, layer, inputs, params, s):
    """The adjoint of a transposed convolution is the convolution with the same weights."""
    node = layer.node
    n = len(static_shape(node.inputs[1])) - 2
    attrs = {
        "kernel_shape": list(static_shape(node.inputs[1])[2:]),
        "strides": int_list(node, "strides", [1] * n),
        "dilations": int_list(node, "dilations", [1] * n),
        "pads": int_list(node, "pads", [0] * (2 * n)),
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


def _matmul_vjp(em, layer, inputs, params, s):
    wt = em.op("Transpose", [params["weight"]], {"perm": [1, 0]}, dtype=em.dtype)
    if layer.acts == [0]:
        return [em.sym(em.op("MatMul", [s, wt], dtype=em.dtype))]
    return [em.sym(em.op("MatMul", [wt, s], dtype=em.dtype))]


def _matmul_check(node: gs.Node, acts: list[int]) -> str | None:
    if len(acts) != 1:
        return "a product of two activations is not supported"
    weight = node.inputs[1 - acts[0]]
    if constant_value(weight) is None:
        return "its weights are not constant"
    if len(static_shape(weight)) != 2:
        return "only 2-D constant weight matrices are supported"
    return None


_WEIGHT_BIAS = const_slots((1, "weight"), (2, "bias"))

SPECS = [
    OpSpec("Conv", Kind.LINEAR, _conv_vjp, params=_WEIGHT_BIAS, check=_constant_weights),
    OpSpec("ConvTranspose", Kind.LINEAR, _conv_transpose_vjp, params=_WEIGHT_BIAS, check=_conv_transpose_check),
    OpSpec("Gemm", Kind.LINEAR, _gemm_vjp, params=_WEIGHT_BIAS, check=_constant_weights),
    OpSpec("MatMul", Kind.LINEAR, _matmul_vjp, params=other_operand("weight"), check=_matmul_check),
]
