"""What an op is to LRP: :class:`OpSpec`, and :class:`Layer`, a node as rules see it.

Every op that relevance can flow through has an :class:`OpSpec`:

- ``kind``: linear layer with parameters, activation, pooling, reshaping, merge,
  normalization, ... (what the model check reports and what type groups match);
- ``params``: which of its inputs are parameters (``weight``, ``bias``) that rules modify;
- ``forward``: the op applied to (rule-modified) inputs and parameters; by default a copy
  of the node with those inputs swapped in;
- ``vjp``: the vector-Jacobian product of the op's linear map, written with
  :mod:`lrpc.symbolic` so it becomes ONNX nodes;
- ``route``: how relevance moves through the op unchanged (PassRule; identity for
  elementwise ops, the inverse reshape for shape ops), or None;
- ``blocks``: inputs that never receive relevance although they depend on the input
  (the gate of a gating multiplication);
- ``multilinear``: the op is a product of its relevance inputs (``Q·Kᵀ``, ``A·V``,
  ``gate * up``), linear in each one separately. The generic formula then hands every
  factor an equal share (AttnLRP's uniform rule: ``Σ_k a_k ⊙ vjp_k(s) = degree · z ⊙ s``);
- ``gate``: for a product, the factor that is a gate (attention probabilities, an
  activated branch), which :class:`~lrpc.rules.ConstantGateRule` holds constant;
- ``taylor``: the exact first-order Taylor relevance at the input
  (:class:`~lrpc.rules.TaylorRule`), for ops whose Jacobian cancels the division by
  the output (Softmax);
- ``derivative``: the op's exact VJP, for the gradient methods, where ``vjp`` or
  ``route`` is LRP's linearization instead (an activation's identity route, a
  normalization with its statistic held, a division with its divisor held);
  ``linearized`` marks such specs, so one without a ``derivative`` is refused by the
  gradient methods rather than differentiated wrongly; ``exact_check`` replaces
  ``check`` for them (a division may then take the gradient through its divisor);
- ``gradient_only``: the op has an exact derivative but no LRP treatment (``Exp``,
  ``ReduceL2``, ...): the gradient methods differentiate it, LRP's check names it as
  unsupported, as without a spec.

Rules never know about ops and ops never know about rules: the emitter combines the two
with one generic formula (see :mod:`lrpc.rules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

import onnx_graphsurgeon as gs

from .symbolic import Emitter, Sym, same_sign


class Kind(str, Enum):
    LINEAR = "linear layer"
    AFFINE = "elementwise affine"
    ACTIVATION = "activation"
    POOLING = "pooling"
    RESHAPING = "reshaping"
    MERGE = "merge"
    NORMALIZATION = "normalization"
    DROPOUT = "dropout"
    ROUTING = "routing"  # exact relevance routing, not a layer (Split, Where)
    SOFTMAX = "softmax"


#: kinds that are not layers: relevance passes them by a fixed route, no rule applies
TRANSPARENT = {Kind.ACTIVATION, Kind.ROUTING}

#: ops that read only an input's shape (or its arg-max), never its values: no relevance
SHAPE_READERS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "EyeLike", "ConstantOfShape"}

#: recurrent layers: refused by name in the model check
RECURRENT = {"LSTM", "GRU", "RNN"}


@dataclass
class Layer:
    """One relevance-carrying node, as rules and VJPs see it."""

    node: gs.Node
    spec: "OpSpec"
    acts: list[int]  # indices of node.inputs that carry relevance
    index: int = -1  # flat layer index (activations have none)
    path_index: tuple = ()  # hierarchical index from the module path in the node name
    is_first: bool = False
    is_last: bool = False
    param_slots: dict[str, int] = field(default_factory=dict)  # role -> input index
    param_values: dict[str, gs.Tensor] = field(default_factory=dict)  # role -> tensor

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op}_{self.index}"

    @property
    def op_type(self) -> str:
        return self.node.op

    @property
    def kind(self) -> "Kind":
        return self.spec.kind

    @property
    def has_weight(self) -> bool:
        return "weight" in self.param_values

    @property
    def has_params(self) -> bool:
        return self.spec.kind is Kind.LINEAR and self.has_weight

    def act(self, k: int = 0) -> gs.Tensor:
        return self.node.inputs[self.acts[k]]

    @property
    def share(self) -> float:
        """The fraction of relevance each relevance input of a product receives."""
        return 1.0 / len(self.acts) if self.spec.multilinear and len(self.acts) > 1 else 1.0

    def operands(self, inputs: list, params: dict) -> dict[int, object]:
        """Input slot -> the (modified) activation or parameter standing there."""
        found = {slot: inputs[k] for k, slot in enumerate(self.acts)}
        for role, slot in self.param_slots.items():
            if role in params:
                found[slot] = params[role]
        return found

    def holding_constant(self, slot: int) -> "Layer":
        """This layer with input ``slot`` treated as a weight instead of an activation
        (CP-LRP's constant attention probabilities and gates)."""
        return replace(self, acts=[a for a in self.acts if a != slot], param_slots={"weight": slot},
                       param_values={"weight": self.node.inputs[slot]})

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    def describe(self) -> str:
        return f"{self.name} ({self.op_type})"


Forward = Callable[[Emitter, Layer, list, dict], Sym]
Vjp = Callable[[Emitter, Layer, list, dict, Sym], list]
Route = Callable[[Emitter, Layer, Sym], list]
OutputsRoute = Callable[[Emitter, Layer, list], list]


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    kind: Kind
    vjp: Vjp | None = None
    forward: Forward | None = None
    params: Callable[[gs.Node, list[int]], dict[str, gs.Tensor | int]] | None = None
    route: Route | None = None
    linear: bool = True  # False for ops whose VJP depends on the input (MaxPool)
    selects: bool = False  # every output is a copy of one input (MaxPool): z = a at the winner
    check: Callable[[gs.Node, list[int]], str | None] | None = None
    blocks: Callable[[gs.Node, int], bool] | None = None
    #: multi-output ops (Split): relevance of every output (None where none) -> per input
    route_outputs: OutputsRoute | None = None
    multilinear: bool = False
    gate: Callable[[gs.Node, list[int]], int | None] | None = None
    taylor: Callable[[Emitter, Layer, Sym], list] | None = None
    derivative: Vjp | None = None
    linearized: bool = False
    exact_check: Callable[[gs.Node, list[int]], str | None] | None = None
    gradient_only: bool = False

    @property
    def exact_vjp(self) -> Vjp | None:
        """The VJP of the op's true derivative, or None where only LRP's linearization is known."""
        if self.derivative is not None:
            return self.derivative
        return None if self.linearized else self.vjp

    def problem(self, node: gs.Node, acts: list[int], exact: bool = False) -> str | None:
        """Why relevance (``exact``: the gradient) cannot pass this node, or None."""
        if exact:
            if self.exact_vjp is None and self.route_outputs is None:
                return f"no exact derivative of {self.op_type} is known (gradient methods need one)"
            check = self.exact_check or self.check
        else:
            check = self.check
        return check(node, acts) if check else None

    def run_forward(self, em: Emitter, layer: Layer, inputs: list, params: dict) -> Sym:
        return (self.forward or clone_forward)(em, layer, inputs, params)


# -- generic pieces ------------------------------------------------------------------


def clone_forward(em: Emitter, layer: Layer, inputs: list, params: dict) -> Sym:
    """The node itself, with (modified) inputs and parameters swapped in."""
    node = layer.node
    new_inputs = list(node.inputs)
    for k, slot in enumerate(layer.acts):
        new_inputs[slot] = inputs[k]
    for role, slot in layer.param_slots.items():
        new_inputs[slot] = params[role]
    return em.sym(em.op(node.op, new_inputs, node.attrs, dtype=em.dtype, hint=node.op),
                  nonneg=_output_nonneg(node, inputs, params))


def _output_nonneg(node: gs.Node, inputs: list, params: dict) -> bool:
    """Known sign in, known sign out: the z⁺ terms of ZPlus (a⁺W⁺ and a⁻W⁻) are >= 0, so
    their stabilizer needs no sign test."""
    if any(float(node.attrs.get(a, 1.0)) < 0 for a in ("alpha", "beta")):
        return False
    bias = params.get("bias")
    if node.op in PRODUCTS:
        weight = params.get("weight")
        bias_ok = bias is None or bias.nonneg
        return len(inputs) == 1 and weight is not None and bias_ok and same_sign(inputs[0], weight)
    return node.op in SIGN_PRESERVING and all(x.nonneg for x in inputs) and all(p.nonneg for p in params.values())


#: linear ops multiplying their input by a weight (sign of the output = product of signs)
PRODUCTS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Mul"}
#: ops whose output is >= 0 when every input and parameter is
SIGN_PRESERVING = {
    "Add", "Sum", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Resize", "Reshape",
    "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Pad",
}


def identity_route(em: Emitter, layer: Layer, R: Sym) -> list:
    return [R]


def vjp_route(em: Emitter, layer: Layer, R: Sym) -> list:
    """PassRule on shape ops: relevance moves where the values moved (the op's own VJP)."""
    return layer.spec.vjp(em, layer, [em.sym(layer.act(k)) for k in range(len(layer.acts))], {}, R)


def identity_vjp(em, layer, inputs, params, s):
    return [s]


# -- parameters and checks shared by several ops ---------------------------------------


def const_slots(*roles_by_slot):
    """Parameters at fixed input slots: ``const_slots((1, "weight"), (2, "bias"))``."""

    def params(node: gs.Node, acts: list[int]):
        out = {}
        for slot, role in roles_by_slot:
            if slot < len(node.inputs) and node.inputs[slot].name and slot not in acts:
                out[role] = slot
        return out

    return params


def other_operand(role: str):
    """Elementwise op with a constant: the non-relevance operand is the parameter."""

    def params(node: gs.Node, acts: list[int]):
        others = [i for i in range(len(node.inputs)) if i not in acts]
        return {role: others[0]} if len(others) == 1 else {}

    return params


def first_input_only(node: gs.Node, acts: list[int]) -> str | None:
    if acts != [0]:
        return "relevance must enter through the first input"
    return None


def int_list(node: gs.Node, name: str, default):
    value = node.attrs.get(name, default)
    return list(value) if value is not None else None


def text_attr(node: gs.Node, name: str, default: str) -> str:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value
