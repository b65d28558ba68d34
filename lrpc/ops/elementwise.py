"""Elementwise ops: merges, arithmetic, products, selection, activations."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import rounded_from, static_shape
from ..spec import Kind, OpSpec, first_input_only, identity_route, identity_vjp, other_operand
from ..symbolic import Emitter, Sym
from .derivatives import DERIVATIVES, GRADIENT_ONLY, elementwise_vjp
from .products import gate_slot


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
    summed = g.sum(axes)
    return em.sym(em.op("Reshape", [summed, em.shape_of(in_tensor)], dtype=em.dtype))


def _add_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s, layer, slot) for slot in layer.acts]


def _sub_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s if slot == 0 else -s, layer, slot) for slot in layer.acts]


def _neg_vjp(em, layer, inputs, params, s):
    return [-s]


# -- Mul: by a constant (a weight), of two activations (a product), or by a gate ----------

#: producers whose output, multiplied with a signal, is a gate (squeeze-and-excitation)
GATES = {"Sigmoid", "HardSigmoid"}


def _is_gate(node: gs.Node, slot: int) -> bool:
    """The operand of a gating product (``x * Sigmoid(...)``, squeeze-and-excitation).

    The gate is treated as a constant: all relevance goes to the signal. (``x *
    Sigmoid(x)`` itself is SiLU and is fused into one activation before this applies.)
    A quantized model's roundings between the gate and the product are looked through.
    """
    if len(node.inputs) != 2:
        return False
    sources = [rounded_from(t)[0] for t in node.inputs]
    producers = [t.inputs[0].op if len(t.inputs) == 1 else None for t in sources]
    return producers[slot] in GATES and producers[1 - slot] not in GATES


#: reductions whose output, in a product or a division, is a statistic of the activation
REDUCTIONS = {"ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
              "ReduceLogSumExp"}
#: ops a statistic stays a statistic through (ε, square roots, powers, reciprocals, ratios
#: of statistics, broadcasting)
_STATISTIC_STEPS = {"Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Reciprocal", "Clip", "Max", "Min", "Abs", "Neg",
                    "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand"}


def is_statistic(tensor, limit: int = 8) -> bool:
    """``tensor`` is computed from reductions of the activation (a norm, a mean, a sum) and
    constants only, by elementwise steps: ConvNeXt-V2's GRN factor ``‖x‖ / mean(‖x‖)``, a
    written-out norm's ``(mean(c²) + ε)^−½``. Every path from the activation passes a
    reduction: ``x − mean(x)`` is not a statistic."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or limit < 0:
        return False
    node = tensor.inputs[0]
    if node.op in REDUCTIONS:
        return True
    if node.op not in _STATISTIC_STEPS:
        return False
    operands = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    return bool(operands) and all(is_statistic(t, limit - 1) for t in operands)


def _held_constant(node: gs.Node, slot: int) -> bool:
    """A product's factor that takes no relevance: a gate, or a statistic of the signal it
    scales (held constant as LayerNormRule holds σ: GRN, normalizations written out)."""
    if _is_gate(node, slot):
        return True
    if len(node.inputs) != 2 or any(isinstance(t, gs.Constant) for t in node.inputs):
        return False
    return is_statistic(node.inputs[slot]) and not is_statistic(node.inputs[1 - slot])


def _mul_vjp(em, layer, inputs, params, s):
    """d(a·b)/da = b: each factor's gradient is ``s`` times the other factor."""
    factors = layer.operands(inputs, params)
    return [unbroadcast(em, s * factors[1 - slot], layer, slot) for slot in layer.acts]


# -- Div: by a divisor computed at run time (a constant one is a Mul by then) -------------


def _div_vjp(em, layer, inputs, params, s):
    """d(a/c)/da = 1/c with the divisor a constant for relevance: a tensor that does not
    depend on the input (DeBERTa's √(3·d) from the head size's Shape, a count), or a
    statistic of the activation, held constant as LayerNormRule holds σ (an L2-normalize's
    norm, GRN's mean norm, the ``Σ + ε`` of a linear attention): an elementwise scaling."""
    return [unbroadcast(em, s / em.sym(layer.node.inputs[1]), layer, 0)]


def _div_derivative(em, layer, inputs, params, s):
    """The exact VJP of ``a / c``: ``s / c`` to the numerator, ``−s·a/c²`` to the divisor."""
    a, c = (em.sym(t) for t in layer.node.inputs[:2])
    grads = {0: s / c, 1: -(s * a / (c * c))}
    return [unbroadcast(em, grads[slot], layer, slot) for slot in layer.acts]


def _divisor_held_constant(node: gs.Node, slot: int) -> bool:
    """The divisor of an activation takes no relevance (a constant numerator, ``1 / x``,
    would leave relevance no way through: it stays on the path and is refused)."""
    return slot == 1 and not isinstance(node.inputs[0], gs.Constant)


def _div_check(node: gs.Node, acts: list[int]) -> str | None:
    if acts != [0]:
        return "relevance cannot pass the divisor of a constant (a reciprocal of the input)"
    return None


# -- Where: relevance goes to the branch each position took --------------------------------


def _where_route(em, layer, R: Sym) -> list:
    condition = layer.node.inputs[0]
    taken = em.op("Cast", [condition], {"to": _float_code(em)}, dtype=em.dtype)
    out = []
    for slot in layer.acts:
        share = em.sym(taken, nonneg=True) if slot == 1 else 1.0 - em.sym(taken, nonneg=True)
        out.append(unbroadcast(em, R * share, layer, slot))
    return out


def _where_derivative(em, layer, inputs, params, s):
    return _where_route(em, layer, s)  # the branch taken gets the gradient, exactly


def _float_code(em: Emitter) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(em.dtype)


def _where_check(node: gs.Node, acts: list[int]) -> str | None:
    if 0 in acts:
        return "relevance cannot pass a condition"
    return None


# -- activations ------------------------------------------------------------------------

#: Elementwise non-linearities: relevance passes through unchanged (Zennit's Pass rule,
#: AttnLRP's identity rule). SiLU and the Gelu/HardSwish patterns of old exporters are
#: fused into these by lrpc.passes.fusion.
ACTIVATIONS = ["Relu", "LeakyRelu", "Clip", "PRelu", "HardSwish", "Gelu", "SiLU", "Swish", "Elu", "Selu", "Celu",
               "Mish", "Softplus", "Tanh", "Sigmoid", "HardSigmoid",
               # powers by a constant and square roots: an STFT front end's magnitude
               # √(re² + im²) shares its relevance between re and im by re² and im²
               "Pow", "Sqrt"]


def activation_spec(op_type: str, derivative=None, gradient_only: bool = False) -> OpSpec:
    """LRP passes relevance through unchanged; the gradient methods multiply by the
    derivative (:mod:`lrpc.ops.derivatives`; a registered op without one is refused there)."""
    derivative = derivative or DERIVATIVES.get(op_type)
    return OpSpec(op_type, Kind.ACTIVATION, identity_vjp, route=identity_route, check=first_input_only,
                  derivative=elementwise_vjp(derivative) if derivative else None, linearized=True,
                  exact_check=_pow_check if op_type == "Pow" else None, gradient_only=gradient_only)


def _pow_check(node: gs.Node, acts: list[int]) -> str | None:
    if not isinstance(node.inputs[1], gs.Constant):
        return "its exponent is computed at run time (the derivative needs a constant one)"
    return first_input_only(node, acts)


SPECS = [
    OpSpec("Add", Kind.MERGE, _add_vjp, params=other_operand("bias")),
    OpSpec("Sub", Kind.MERGE, _sub_vjp, params=other_operand("bias")),
    OpSpec("Sum", Kind.MERGE, _add_vjp),
    OpSpec("Div", Kind.AFFINE, _div_vjp, check=_div_check, blocks=_divisor_held_constant,
           derivative=_div_derivative, linearized=True, exact_check=lambda node, acts: None),
    OpSpec("Neg", Kind.AFFINE, _neg_vjp, check=first_input_only),
    OpSpec("Mul", Kind.AFFINE, _mul_vjp, params=other_operand("weight"), blocks=_held_constant, multilinear=True,
           gate=gate_slot),
    OpSpec("Where", Kind.ROUTING, route=_where_route, check=_where_check, derivative=_where_derivative),
    *[activation_spec(op) for op in ACTIVATIONS],
    # an activation's rounding in a quantized graph (QuantizeLinear -> DequantizeLinear):
    # relevance passes through it as through an activation (straight-through)
    *[activation_spec(op) for op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")],
    *[activation_spec(op, gradient_only=True) for op in GRADIENT_ONLY],
]

