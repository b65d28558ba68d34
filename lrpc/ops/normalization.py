"""Normalizations and the softmax: BatchNorm, LRN, InstanceNorm, LayerNorm, RMSNorm, Softmax.

A data-dependent normalization is not linear in its input, so LRP linearizes it: the
normalizing statistic is held at its forward value (AttnLRP, Achtibat et al. 2024; the
LRP-LN rule of Ali et al. 2022). With σ constant, LayerNorm ``y = (x − μ(x))/σ · γ + β``
is an affine map of ``x`` (the centring stays), RMSNorm ``y = x/rms · γ`` a scaling.
Each spec's forward and VJP are those of that linear map, so every rule applies through
the generic formula; :class:`~lrpc.rules.LayerNormRule` is the ε-rule on it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value, static_shape
from ..spec import Kind, OpSpec, const_slots, first_input_only, identity_route
from ..symbolic import Emitter, Sym

# -- standalone BatchNormalization: y = x * weight + bias per channel -------------------


def _bn_params(node: gs.Node, acts: list[int]):
    scale, bias, mean, var = (constant_value(t) for t in node.inputs[1:5])
    eps = float(node.attrs.get("epsilon", 1e-5))
    weight = scale / np.sqrt(var + eps)
    shift = bias - mean * weight
    rank = len(static_shape(node.inputs[0]) or (0, 0, 0, 0))
    tail = (1,) * max(rank - 2, 0)
    name = node.outputs[0].name
    return {
        "weight": gs.Constant(f"{name}/lrp_weight", weight.reshape(-1, *tail).astype(scale.dtype)),
        "bias": gs.Constant(f"{name}/lrp_bias", shift.reshape(-1, *tail).astype(scale.dtype)),
    }


def _bn_check(node: gs.Node, acts: list[int]) -> str | None:
    if any(constant_value(t) is None for t in node.inputs[1:5]):
        return "its statistics are not constant (training mode)"
    return first_input_only(node, acts)


def affine_forward(em, layer, inputs, params):
    """``x · weight + bias`` with parameters an op holds in another form (BatchNorm's
    statistics, scikit-learn's Scaler attributes)."""
    return inputs[0] * params["weight"] + params["bias"]


def affine_vjp(em, layer, inputs, params, s):
    return [s * params["weight"]]


def _scaler_params(node: gs.Node, acts: list[int]):
    """scikit-learn's ``StandardScaler`` as skl2onnx writes it: ``Scaler(x) = (x − offset)·scale``."""
    scale = np.asarray(node.attrs.get("scale", [1.0]), dtype=np.float32)
    offset = np.asarray(node.attrs.get("offset", [0.0]), dtype=np.float32)
    name = node.outputs[0].name
    return {"weight": gs.Constant(f"{name}/lrp_weight", scale),
            "bias": gs.Constant(f"{name}/lrp_bias", (-offset * scale).astype(np.float32))}


# -- LRN, InstanceNorm: the whole normalizing factor held constant -----------------------


def _linearized_vjp(em, layer, inputs, params, s):
    """``y = x · f(x)`` with the normalizing factor ``f`` held constant (its value at the
    forward pass): the VJP is ``s · y / x``, so Zero/Epsilon pass relevance through as
    the PassRule does."""
    x, y = em.sym(layer.act()), em.sym(layer.output)
    safe = x + x.mask("eq")  # where x == 0, y/x is irrelevant: the rule multiplies by x
    return [s * (y / safe)]


def _factor_held(op_type: str, derivative) -> OpSpec:
    return OpSpec(op_type, Kind.NORMALIZATION, _linearized_vjp, route=identity_route, linear=False,
                  check=first_input_only, derivative=derivative, linearized=True)


def _channel_window_sum(em: Emitter, t: Sym, before: int, after: int, channels: int) -> Sym:
    """``Σ_{i=c−before}^{c+after} t[:, i]`` for every channel ``c`` (zeros beyond the ends):
    an AveragePool over the channel axis of ``t`` viewed as ``[N, 1, C, rest]``."""
    size = before + after + 1
    folded = em.op("Reshape", [t, em.ints([0, 1, channels, -1])], dtype=em.dtype)
    pooled = em.op("AveragePool", [folded], {"kernel_shape": [size, 1], "pads": [before, 0, after, 0],
                                             "count_include_pad": 1}, dtype=em.dtype)
    return em.sym(em.op("Reshape", [pooled, em.shape_of(t)], dtype=em.dtype)) * float(size)


def _lrn_derivative(em, layer, inputs, params, s):
    """LRN ``y = x·d^−β``, ``d = k + α/n·Σ_window x²``: ``∂L/∂x = s·d^−β − (2αβ/n)·x·Σ_window' s·x·d^−β−1``,
    where the second window is the first one reversed (the transpose of the channel sum)."""
    node = layer.node
    size = int(node.attrs["size"])
    alpha, beta, bias = (float(node.attrs.get(k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    x = em.sym(layer.act())
    channels = static_shape(layer.act())[1] or -1
    d = _channel_window_sum(em, x * x, before, after, channels) * (alpha / size) + bias
    scaled = em.sym(em.op("Pow", [d, em.const(-beta)], dtype=em.dtype))
    back = _channel_window_sum(em, s * x * scaled / d, after, before, channels)
    return [s * scaled - x * back * (2.0 * alpha * beta / size)]


def _standardized_vjp(em: Emitter, x: Sym, g: Sym, axes: list[int], centre: bool, eps: float) -> Sym:
    """The exact VJP of ``x ↦ (x − μ)/σ`` over ``axes`` (RMS: ``x/rms``, ``centre`` off) at
    ``g``: ``(g − mean g − x̂·mean(g·x̂))/σ`` (without ``mean g`` for RMS)."""
    def mean(t: Sym) -> Sym:
        return t.mean(axes, shape_of=x.value)  # the count from the input's static shape

    d = x - mean(x) if centre else x
    root = em.sym(em.op("Sqrt", [mean(d * d) + eps], dtype=em.dtype), nonneg=True)
    inverse = em.sym(em.op("Reciprocal", [root], dtype=em.dtype), nonneg=True)
    normalized = d * inverse
    inner = g - mean(g) if centre else g
    return (inner - normalized * mean(g * normalized)) * inverse


def _instancenorm_derivative(em, layer, inputs, params, s):
    node = layer.node
    rank = len(static_shape(layer.act()))
    scale = em.op("Reshape", [node.inputs[1], em.ints([-1] + [1] * (rank - 2))], dtype=em.dtype)
    return [_standardized_vjp(em, em.sym(layer.act()), s * em.sym(scale), list(range(2, rank)), True,
                              float(node.attrs.get("epsilon", 1e-5)))]


def _instancenorm_check(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return first_input_only(node, acts)


def _lrn_check(node: gs.Node, acts: list[int]) -> str | None:
    shape = static_shape(node.inputs[0])
    if shape is None or len(shape) < 3:
        return "input rank is unknown"
    return first_input_only(node, acts)


# -- LayerNorm and RMSNorm with σ (rms) held constant ------------------------------------


def _normalized_axes(layer) -> list[int]:
    rank = len(static_shape(layer.act()))
    axis = int(layer.node.attrs.get("axis", -1)) % rank
    return list(range(axis, rank))


def _mean(x: Sym, layer) -> Sym:
    """Mean over the normalized axes, counted from the layer input's static shape."""
    return x.mean(_normalized_axes(layer), shape_of=layer.act())


def _eps(layer) -> float:
    return float(layer.node.attrs.get("epsilon", 1e-5))


def _inverse_scale(em: Emitter, layer, centre: bool) -> Sym:
    """``1/σ`` (LayerNorm, ``centre``) or ``1/rms`` (RMSNorm) of the layer's own input:
    the statistic LRP holds constant. Computed once per layer (the emitter memoizes)."""
    a = em.sym(layer.act())
    d = a - _mean(a, layer) if centre else a
    spread = _mean(d * d, layer) + _eps(layer)
    root = em.sym(em.op("Sqrt", [spread], dtype=em.dtype), nonneg=True)
    return em.sym(em.op("Reciprocal", [root], dtype=em.dtype), nonneg=True)


def _affine(y: Sym, params: dict) -> Sym:
    if "weight" in params:
        y = y * params["weight"]
    if "bias" in params:
        y = y + params["bias"]
    return y


def _layernorm_forward(em, layer, inputs, params):
    x = inputs[0]
    return _affine((x - _mean(x, layer)) * _inverse_scale(em, layer, True), params)


def _layernorm_vjp(em, layer, inputs, params, s):
    """The adjoint of ``x ↦ (x − mean x)·γ/σ``: ``(γs − mean(γs))/σ`` (centring is symmetric)."""
    g = s * params["weight"] if "weight" in params else s
    return [(g - _mean(g, layer)) * _inverse_scale(em, layer, True)]


def _rmsnorm_forward(em, layer, inputs, params):
    return _affine(inputs[0] * _inverse_scale(em, layer, False), params)


def _rmsnorm_vjp(em, layer, inputs, params, s):
    g = s * params["weight"] if "weight" in params else s
    return [g * _inverse_scale(em, layer, False)]


def _layernorm_derivative(em, layer, inputs, params, s):
    """The full Jacobian, σ differentiated too (LRP holds it constant)."""
    g = s * params["weight"] if "weight" in params else s
    return [_standardized_vjp(em, em.sym(layer.act()), g, _normalized_axes(layer), True, _eps(layer))]


def _rmsnorm_derivative(em, layer, inputs, params, s):
    g = s * params["weight"] if "weight" in params else s
    return [_standardized_vjp(em, em.sym(layer.act()), g, _normalized_axes(layer), False, _eps(layer))]


def _norm_check(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return first_input_only(node, acts)


def _statistic_held(op_type: str, forward, vjp, derivative) -> OpSpec:
    # scale (γ) and bias (β) are parameters; a fused pattern has neither
    return OpSpec(op_type, Kind.NORMALIZATION, vjp, forward=forward, params=const_slots((1, "weight"), (2, "bias")),
                  route=identity_route, check=_norm_check, derivative=derivative, linearized=True)


# -- Softmax inside the network -------------------------------------------------------------


def _softmax_axis(layer) -> list[int]:
    rank = len(static_shape(layer.act()))
    return [int(layer.node.attrs.get("axis", -1)) % rank]


def _softmax_vjp(em, layer, inputs, params, s):
    """Jacobian-transpose of the softmax at the layer's input: ``p ⊙ (s − Σ p ⊙ s)``."""
    p = em.sym(layer.output, nonneg=True)
    ps = p * s
    return [ps - p * ps.sum(_softmax_axis(layer))]


def _softmax_taylor(em, layer, R):
    """``x ⊙ (R − p ⊙ Σ R)``: the Taylor expansion at ``x``, with the division by ``p``
    cancelled, so no stabilizer is needed. Masked positions (``p == 0``, from ``-inf`` or
    the dtype's lowest value) get 0, never NaN."""
    x, p = em.sym(layer.act()), em.sym(layer.output, nonneg=True)
    relevance = x * (R - p * R.sum(_softmax_axis(layer)))
    masked = em.op("Equal", [p, em.const(0.0)], dtype=np.bool_)
    return [em.sym(em.const(0.0)).where(masked, relevance)]


def _softmax_check(node: gs.Node, acts: list[int]) -> str | None:
    return _norm_check(node, acts)


SPECS = [
    OpSpec("BatchNormalization", Kind.NORMALIZATION, affine_vjp, forward=affine_forward, params=_bn_params,
           route=identity_route, check=_bn_check),
    OpSpec("Scaler", Kind.AFFINE, affine_vjp, forward=affine_forward, params=_scaler_params, check=first_input_only),
    replace(_factor_held("LRN", _lrn_derivative), exact_check=_lrn_check),
    replace(_factor_held("InstanceNormalization", _instancenorm_derivative), exact_check=_instancenorm_check),
    _statistic_held("LayerNormalization", _layernorm_forward, _layernorm_vjp, _layernorm_derivative),
    _statistic_held("RMSNormalization", _rmsnorm_forward, _rmsnorm_vjp, _rmsnorm_derivative),
    OpSpec("Softmax", Kind.SOFTMAX, _softmax_vjp, linear=False, check=_softmax_check, taylor=_softmax_taylor),
]
