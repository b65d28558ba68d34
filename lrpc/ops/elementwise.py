"""Elementwise ops: merges, arithmetic with constants, gates, activations, normalizations."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value, static_shape
from ..spec import (
    Kind, OpSpec, first_input_only, identity_route, identity_vjp, other_operand,
)
from ..symbolic import Emitter, Sym


def unbroadcast(em: Emitter, g: Sym, layer, slot: int) -> Sym:
    """Sum ``g`` (shaped like the layer output) back to the shape of input ``slot``."""
    out_shape = static_shape(layer.output)
    in_tensor = layer.node.inputs[slot]
    in_shape = static_shape(in_tensor)
    if out_shape is None or in_shape is None:
        return g
    lead = len(out_shape) - len(in_shape)
    axes = list(range(lead)) + [i + lead for i, d in enumerate(in_shape) if d == 1 and out_shape[i + lead] != 1]
    if not axes:
        return g
    summed = em.op("ReduceSum", [g, em.ints(axes)], {"keepdims": 1}, dtype=em.dtype)
    return em.sym(em.op("Reshape", [summed, em.shape_of(in_tensor)], dtype=em.dtype))


def _add_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s, layer, slot) for slot in layer.acts]


def _sub_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s if slot == 0 else -s, layer, slot) for slot in layer.acts]


# -- Mul: by a constant (a weight) or by a gate ---------------------------------------

GATES = {"Sigmoid", "HardSigmoid"}


def _is_gate(node: gs.Node, slot: int) -> bool:
    """The operand of a gating product (``x * Sigmoid(...)``, squeeze-and-excitation).

    The gate is treated as a constant: all relevance goes to the signal. (``x *
    Sigmoid(x)`` itself is SiLU and is fused into one activation before this applies.)
    """
    if len(node.inputs) != 2:
        return False
    producers = [t.inputs[0].op if len(t.inputs) == 1 else None for t in node.inputs]
    return producers[slot] in GATES and producers[1 - slot] not in GATES


def _mul_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s * params["weight"], layer, layer.acts[0])]


def _mul_check(node: gs.Node, acts: list[int]) -> str | None:
    if len(acts) != 1:
        return "a product of two activations is not supported (only gates: x * Sigmoid(...), x * HardSigmoid(...))"
    return None


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


def _bn_forward(em, layer, inputs, params):
    return inputs[0] * params["weight"] + params["bias"]


def _bn_vjp(em, layer, inputs, params, s):
    return [s * params["weight"]]


# -- data-dependent normalizations (LRN, InstanceNorm, LayerNorm) ----------------------


def _linearized_vjp(em, layer, inputs, params, s):
    """``y = x · f(x)`` with the normalizing factor ``f`` held constant (its value at the
    forward pass): the VJP is ``s · y / x``, so Zero/Epsilon pass relevance through as
    the PassRule does."""
    x, y = em.sym(layer.act()), em.sym(layer.output)
    safe = x + x.mask("eq")  # where x == 0, y/x is irrelevant: the rule multiplies by x
    return [s * (y / safe)]


def _layernorm_check(node: gs.Node, acts: list[int]) -> str | None:
    return "LayerNorm is recognized, but its LRP rule (LayerNormRule) is not implemented yet"


def _normalization(op_type: str, check=first_input_only) -> OpSpec:
    return OpSpec(op_type, Kind.NORMALIZATION, _linearized_vjp, route=identity_route, linear=False, check=check)


# -- activations ------------------------------------------------------------------------

#: ReLU-like activations and their smooth relatives: relevance passes through unchanged
#: (Zennit's Pass rule). SiLU and the Gelu/HardSwish patterns of old exporters are fused
#: into these by lrpc.passes.fusion.
ACTIVATIONS = ["Relu", "LeakyRelu", "Clip", "PRelu", "HardSwish", "Gelu", "SiLU", "Swish", "Elu", "Selu", "Celu",
               "Mish", "Softplus"]


def activation_spec(op_type: str) -> OpSpec:
    return OpSpec(op_type, Kind.ACTIVATION, identity_vjp, route=identity_route, check=first_input_only)


SPECS = [
    OpSpec("Add", Kind.MERGE, _add_vjp, params=other_operand("bias")),
    OpSpec("Sub", Kind.MERGE, _sub_vjp, params=other_operand("bias")),
    OpSpec("Sum", Kind.MERGE, _add_vjp),
    OpSpec("Mul", Kind.AFFINE, _mul_vjp, params=other_operand("weight"), check=_mul_check, blocks=_is_gate),
    OpSpec("BatchNormalization", Kind.NORMALIZATION, _bn_vjp, forward=_bn_forward, params=_bn_params,
           route=identity_route, check=_bn_check),
    _normalization("LRN"),
    _normalization("InstanceNormalization"),
    _normalization("LayerNormalization", check=_layernorm_check),
    *[activation_spec(op) for op in ACTIVATIONS],
]
