"""Exact derivatives of the elementwise non-linearities, for the gradient methods.

LRP passes relevance through an activation unchanged (its route); a gradient method needs
``∂y/∂x``. Each entry maps an op type to ``f'(x)`` written with :mod:`lrpc.symbolic`, from
the op's input ``x``, its output ``y`` and its node (attributes, a PRelu's slope). Where a
derivative is undefined at a point (ReLU at 0, a clip's bounds), the value is torch
autograd's, so attributions agree with Captum's to the last bit that float arithmetic allows.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..symbolic import Emitter, Sym

#: (emitter, x, y, node) -> f'(x), elementwise
Derivative = Callable[[Emitter, Sym, Sym, gs.Node], Sym]


def _unary(em: Emitter, op_type: str, x: Sym, **attrs) -> Sym:
    return em.sym(em.op(op_type, [x], attrs, dtype=em.dtype))


def _attr(node: gs.Node, name: str, default: float) -> float:
    return float(node.attrs.get(name, default))


def _flag(em: Emitter, op_type: str, x: Sym, bound) -> gs.Variable:
    """The boolean ``x <op> bound``."""
    bound = bound if isinstance(bound, gs.Tensor) else em.const(float(bound))
    return em.op(op_type, [x, bound], dtype=np.bool_)


def _step(em: Emitter, x: Sym, inside, outside, op_type: str = "Greater", bound=0.0) -> Sym:
    """``inside`` where ``x <op> bound``, else ``outside`` (numbers or Syms)."""
    value = inside if isinstance(inside, Sym) else em.sym(em.const(float(inside)))
    return value.where(_flag(em, op_type, x, bound), outside)


def _sigmoid(em: Emitter, x: Sym) -> Sym:
    return _unary(em, "Sigmoid", x)


def relu(em, x, y, node):
    return _step(em, x, 1.0, 0.0)  # torch: 0 at x == 0


def leaky_relu(em, x, y, node):
    return _step(em, x, 1.0, _attr(node, "alpha", 0.01))


def prelu(em, x, y, node):
    return _step(em, x, 1.0, em.sym(node.inputs[1]))


def clip(em, x, y, node):
    """1 inside ``[min, max]``, bounds included (torch.clamp's gradient)."""
    ones = x.ones_like()
    inside = None
    for slot, op_type in ((1, "GreaterOrEqual"), (2, "LessOrEqual")):
        bound = node.inputs[slot] if len(node.inputs) > slot and node.inputs[slot].name else None
        if bound is None:
            continue
        flag = _flag(em, op_type, x, bound)
        inside = flag if inside is None else em.op("And", [inside, flag], dtype=np.bool_)
    if inside is None:
        return ones
    return em.sym(em.const(1.0)).where(inside, 0.0)


def hard_sigmoid(em, x, y, node):
    """α inside the linear part ``0 < αx + β < 1`` (ends excluded, as torch's hardsigmoid)."""
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    linear = x * alpha + beta
    inside = em.op("And", [_flag(em, "Greater", linear, 0.0), _flag(em, "Less", linear, 1.0)], dtype=np.bool_)
    return em.sym(em.const(alpha)).where(inside, 0.0)


def hard_swish(em, x, y, node):
    """0 below −3, ``x/3 + 1/2`` up to 3 (included), 1 above (torch's hardswish)."""
    middle = (x * (1.0 / 3.0) + 0.5).where(_flag(em, "LessOrEqual", x, 3.0), 1.0)
    return middle.where(_flag(em, "GreaterOrEqual", x, -3.0), 0.0)


def gelu(em, x, y, node):
    approximate = node.attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = _unary(em, "Tanh", (x + x * x * x * 0.044715) * k)
        return (t + 1.0) * 0.5 + x * (1.0 - t * t) * ((x * x * (3 * 0.044715) + 1.0) * (0.5 * k))
    cdf = (_unary(em, "Erf", x * (1.0 / math.sqrt(2.0))) + 1.0) * 0.5
    pdf = _unary(em, "Exp", x * x * -0.5) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _swish(em, x, alpha: float):
    s = _sigmoid(em, x * alpha if alpha != 1.0 else x)
    return s + x * (s * (1.0 - s)) * alpha


def silu(em, x, y, node):
    return _swish(em, x, 1.0)


def swish(em, x, y, node):
    return _swish(em, x, _attr(node, "alpha", 1.0))


def elu(em, x, y, node):
    return _step(em, x, 1.0, _unary(em, "Exp", x) * _attr(node, "alpha", 1.0))


def selu(em, x, y, node):
    alpha, gamma = _attr(node, "alpha", 1.67326319217681884765625), _attr(node, "gamma", 1.05070102214813232421875)
    return _step(em, x, gamma, _unary(em, "Exp", x) * (alpha * gamma))


def celu(em, x, y, node):
    return _step(em, x, 1.0, _unary(em, "Exp", x * (1.0 / _attr(node, "alpha", 1.0))))


def mish(em, x, y, node):
    t = _unary(em, "Tanh", _unary(em, "Softplus", x))
    return t + x * (1.0 - t * t) * _sigmoid(em, x)


def softplus(em, x, y, node):
    return _sigmoid(em, x)


def tanh(em, x, y, node):
    return 1.0 - y * y


def sigmoid(em, x, y, node):
    return y * (1.0 - y)


def power(em, x, y, node):
    """``p·x^(p−1)`` for a constant exponent ``p`` (the check refuses a computed one)."""
    p = np.asarray(node.inputs[1].values, dtype=np.float64)
    lowered = em.sym(em.op("Pow", [x, em.const((p - 1.0).astype(em.dtype))], dtype=em.dtype))
    return lowered * em.sym(em.const(p.astype(em.dtype)))


def square_root(em, x, y, node):
    return _unary(em, "Reciprocal", y) * 0.5


def _scale(em: Emitter, x: Sym, node: gs.Node, scale, shape_of=None) -> Sym:
    """A quantizer's scale (or zero point) broadcast to ``x``: a scalar, or one per channel
    along ``axis``; ``shape_of``: the tensor whose shape ``scale`` has (a cast's input)."""
    shape = getattr(shape_of if shape_of is not None else scale, "shape", None)
    rank = len(x.value.shape) if getattr(x.value, "shape", None) else None
    if shape and len(shape) == 1 and rank and rank > 1:
        axis = int(node.attrs.get("axis", 1)) % rank
        scale = em.op("Reshape", [scale, em.ints([-1 if i == axis else 1 for i in range(rank)])], dtype=em.dtype)
    return em.sym(scale)


def quantize(em, x, y, node):
    """Straight-through inside the integer range, 0 where the rounding saturates (as torch's
    fake-quantization backward, quantization-aware training's gradient): ``1/scale`` where
    ``lo <= round(x/scale) + zero <= hi``. The saturation matters: a quantizer with zero
    point 0 is the ReLU the quantization tool fused away."""
    if node.op == "DynamicQuantizeLinear":  # its range covers every x (scale from x's own min and max)
        return _unary(em, "Reciprocal", _scale(em, x, node, node.outputs[1]))
    scale = _scale(em, x, node, node.inputs[1])
    try:
        bounds = np.iinfo(np.dtype(node.outputs[0].dtype or np.uint8))
    except (TypeError, ValueError):  # a float8 or an unknown type: no saturation known
        return _unary(em, "Reciprocal", scale)
    q = _unary(em, "Round", x / scale)
    if len(node.inputs) > 2 and node.inputs[2].name:
        zero = em.op("Cast", [node.inputs[2]], {"to": _float_type(em)}, dtype=em.dtype)
        q = q + _scale(em, x, node, zero, shape_of=node.inputs[2])
    inside = em.op("And", [_flag(em, "GreaterOrEqual", q, float(bounds.min)),
                           _flag(em, "LessOrEqual", q, float(bounds.max))], dtype=np.bool_)
    return _unary(em, "Reciprocal", scale).where(inside, 0.0)


def _float_type(em: Emitter) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(em.dtype))


def dequantize(em, x, y, node):
    """``(q − zero point) · scale``: linear, its derivative the scale."""
    return _scale(em, x, node, node.inputs[1])


def exp(em, x, y, node):
    return y


def log(em, x, y, node):
    return _unary(em, "Reciprocal", x)


def reciprocal(em, x, y, node):
    return -(y * y)


def absolute(em, x, y, node):
    return _unary(em, "Sign", x)  # 0 at 0, as torch


def erf(em, x, y, node):
    return _unary(em, "Exp", x * x * -1.0) * (2.0 / math.sqrt(math.pi))


def sine(em, x, y, node):
    return _unary(em, "Cos", x)


def cosine(em, x, y, node):
    return -_unary(em, "Sin", x)


def softsign(em, x, y, node):
    d = _unary(em, "Abs", x) + 1.0
    return _unary(em, "Reciprocal", d * d)


#: differentiable elementwise ops LRP has no rule for (a written-out softmax's Exp, a
#: norm's Reciprocal): the gradient methods take them, LRP's check refuses them
GRADIENT_ONLY: dict[str, Derivative] = {
    "Exp": exp, "Log": log, "Reciprocal": reciprocal, "Abs": absolute, "Erf": erf, "Sin": sine, "Cos": cosine,
    "Softsign": softsign,
}

DERIVATIVES: dict[str, Derivative] = {
    "Relu": relu, "LeakyRelu": leaky_relu, "PRelu": prelu, "Clip": clip, "HardSigmoid": hard_sigmoid,
    "HardSwish": hard_swish, "Gelu": gelu, "SiLU": silu, "Swish": swish, "Elu": elu, "Selu": selu, "Celu": celu,
    "Mish": mish, "Softplus": softplus, "Tanh": tanh, "Sigmoid": sigmoid, "Pow": power, "Sqrt": square_root,
    "QuantizeLinear": quantize, "DequantizeLinear": dequantize, "DynamicQuantizeLinear": quantize,
    **GRADIENT_ONLY,
}


def elementwise_vjp(derivative: Derivative):
    """The VJP ``s ⊙ f'(x)`` of an elementwise op from its derivative."""

    def vjp(em, layer, inputs, params, s):
        x, y = em.sym(layer.act()), em.sym(layer.output)
        return [s * derivative(em, x, y, layer.node)]

    return vjp
