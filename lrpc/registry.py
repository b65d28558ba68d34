"""The support registry: what each ONNX op is to LRP, and its VJP.

Every op that relevance can flow through has an :class:`OpSpec`:

- ``kind``: linear layer with parameters, activation, pooling, reshaping, merge,
  normalization, ... (what the model check reports and what type groups match);
- ``params``: which of its inputs are parameters (``weight``, ``bias``) that rules modify;
- ``forward``: the op applied to (rule-modified) inputs and parameters; by default a copy
  of the node with those inputs swapped in;
- ``vjp``: the vector-Jacobian product of the op's linear map, written with
  :mod:`lrpc.symbolic` so it becomes ONNX nodes;
- ``route``: how :class:`~lrpc.rules.PassRule` moves relevance through the op unchanged
  (identity for elementwise ops, the inverse reshape for shape ops), or None.

Rules never know about ops and ops never know about rules: the emitter combines the two
with one generic formula (see :mod:`lrpc.rules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .graph import constant_value, static_shape
from .symbolic import Emitter, Sym


class Kind(str, Enum):
    LINEAR = "linear layer"
    AFFINE = "elementwise affine"
    ACTIVATION = "activation"
    POOLING = "pooling"
    RESHAPING = "reshaping"
    MERGE = "merge"
    NORMALIZATION = "normalization"
    DROPOUT = "dropout"


@dataclass
class Layer:
    """One relevance-carrying node, as rules and VJPs see it."""

    node: gs.Node
    spec: "OpSpec"
    acts: list[int]  # indices of node.inputs that carry relevance
    index: int = -1  # flat layer index (activations have none)
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
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    def describe(self) -> str:
        return f"{self.name} ({self.op_type})"


Forward = Callable[[Emitter, Layer, list, dict], Sym]
Vjp = Callable[[Emitter, Layer, list, dict, Sym], list]
Route = Callable[[Emitter, Layer, Sym], list]


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
    nonneg = node.op in ("MaxPool", "AveragePool", "GlobalAveragePool") and all(x.nonneg for x in inputs)
    return em.sym(em.op(node.op, new_inputs, node.attrs, dtype=em.dtype, hint=node.op), nonneg=nonneg)


def identity_route(em: Emitter, layer: Layer, R: Sym) -> list:
    return [R]


def vjp_route(em: Emitter, layer: Layer, R: Sym) -> list:
    """PassRule on shape ops: relevance moves where the values moved (the op's own VJP)."""
    return layer.spec.vjp(em, layer, [em.sym(layer.act(k)) for k in range(len(layer.acts))], {}, R)


def unbroadcast(em: Emitter, g: Sym, layer: Layer, slot: int) -> Sym:
    """Sum ``g`` (shaped like the layer output) back to the shape of input ``slot``."""
    out_shape = static_shape(layer.output)
    in_tensor = layer.node.inputs[slot]
    in_shape = static_shape(in_tensor)
    if out_shape is None or in_shape is None:
        return g
    lead = len(out_shape) - len(in_shape)
    axes = list(range(lead)) + [
        i + lead for i, d in enumerate(in_shape) if d == 1 and out_shape[i + lead] != 1
    ]
    if not axes:
        return g
    summed = em.op("ReduceSum", [g, em.ints(axes)], {"keepdims": 1}, dtype=em.dtype)
    return em.sym(em.op("Reshape", [summed, em.shape_of(in_tensor)], dtype=em.dtype))


def reshape_back(em: Emitter, layer: Layer, s: Sym, k: int = 0) -> Sym:
    return em.sym(em.op("Reshape", [s, em.shape_of(layer.act(k))], dtype=em.dtype))


def _ints(node: gs.Node, name: str, default):
    value = node.attrs.get(name, default)
    return list(value) if value is not None else None


def spatial_pads(node: gs.Node, in_spatial, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads, resolving ``auto_pad`` from static shapes."""
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    n = len(kernel)
    if auto in ("NOTSET", ""):
        return _ints(node, "pads", [0] * (2 * n))
    if auto == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        out = -(-in_spatial[i] // strides[i])
        total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - in_spatial[i], 0)
        small = total // 2
        begin = small if auto == "SAME_UPPER" else total - small
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def window_geometry(layer: Layer, kernel) -> dict:
    """Strides, dilations, explicit pads and the ConvTranspose output_padding that makes
    the transposed window map return exactly the input's spatial size."""
    node = layer.node
    n = len(kernel)
    in_shape = static_shape(layer.act())
    out_shape = static_shape(layer.output)
    strides = _ints(node, "strides", [1] * n)
    dilations = _ints(node, "dilations", [1] * n)
    in_sp = in_shape[2:] if in_shape else None
    out_sp = out_shape[2:] if out_shape else None
    if not in_sp or not out_sp or None in in_sp or None in out_sp:
        raise _dynamic_spatial(layer)
    pads = spatial_pads(node, in_sp, kernel, strides, dilations)
    output_padding = []
    for i in range(n):
        produced = (out_sp[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - pads[i] - pads[i + n]
        output_padding.append(in_sp[i] - produced)
    return {"strides": strides, "dilations": dilations, "pads": pads, "output_padding": output_padding}


def _dynamic_spatial(layer: Layer):
    from .errors import UnsupportedModelError

    return UnsupportedModelError(
        f"{layer.describe()}: spatial input size is not static; give the model a fixed height/width"
    )


def _transposed_window(em: Emitter, layer: Layer, s: Sym, weight, kernel, group: int) -> Sym:
    """ConvTranspose of ``s`` with the layer's window geometry (the VJP of a windowed op).

    A negative output_padding (ceil_mode pooling, windows past the input) is realised as
    a crop after the ConvTranspose.
    """
    geo = window_geometry(layer, kernel)
    crop = [min(p, 0) for p in geo["output_padding"]]
    attrs = {
        "kernel_shape": list(kernel),
        "strides": geo["strides"],
        "dilations": geo["dilations"],
        "pads": geo["pads"],
        "group": group,
        "output_padding": [max(p, 0) for p in geo["output_padding"]],
    }
    out = em.op("ConvTranspose", [s, weight], attrs, dtype=em.dtype)
    if any(crop):
        in_sp = static_shape(layer.act())[2:]
        axes = list(range(2, 2 + len(kernel)))
        out = em.op("Slice", [out, em.ints([0] * len(kernel)), em.ints(in_sp), em.ints(axes)], dtype=em.dtype)
    return em.sym(out)


# -- parameters ----------------------------------------------------------------------


def _const_slots(*roles_by_slot):
    """Parameters at fixed input slots: ``_const_slots((1, "weight"), (2, "bias"))``."""

    def params(node: gs.Node, acts: list[int]):
        out = {}
        for slot, role in roles_by_slot:
            if slot < len(node.inputs) and node.inputs[slot].name and slot not in acts:
                out[role] = slot
        return out

    return params


def _other_operand(role: str):
    """Elementwise op with a constant: the non-relevance operand is the parameter."""

    def params(node: gs.Node, acts: list[int]):
        others = [i for i in range(len(node.inputs)) if i not in acts]
        return {role: others[0]} if len(others) == 1 else {}

    return params


def _all_constant(slots) -> Callable[[gs.Node, list[int]], str | None]:
    def check(node: gs.Node, acts: list[int]) -> str | None:
        for slot in slots:
            if slot < len(node.inputs) and node.inputs[slot].name and slot in acts:
                return "its weights depend on the input (only constant weights are supported)"
        if acts != [0]:
            return "relevance must enter through the first input"
        return None

    return check


def _single_relevance_input(node: gs.Node, acts: list[int]) -> str | None:
    if len(acts) != 1:
        return "a product of two activations is not supported (register a gate rule or treat one side as constant)"
    return None


# -- VJPs ----------------------------------------------------------------------------


def _conv_vjp(em, layer, inputs, params, s):
    w = params["weight"]
    kernel = list(static_shape(layer.node.inputs[1])[2:])
    return [_transposed_window(em, layer, s, w, kernel, int(layer.node.attrs.get("group", 1)))]


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
    w = params["weight"]
    rank = len(static_shape(layer.node.inputs[layer.param_slots["weight"]]))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    wt = em.op("Transpose", [w], {"perm": perm}, dtype=em.dtype)
    if layer.acts == [0]:
        return [em.sym(em.op("MatMul", [s, wt], dtype=em.dtype))]
    return [em.sym(em.op("MatMul", [wt, s], dtype=em.dtype))]


def _matmul_check(node: gs.Node, acts: list[int]) -> str | None:
    if len(acts) != 1:
        return "a product of two activations is not supported"
    weight = node.inputs[1 - acts[0]]
    shape = static_shape(weight)
    if constant_value(weight) is None:
        return "its weights are not constant"
    if shape is None or len(shape) != 2:
        return "only 2-D constant weight matrices are supported"
    return None


def _add_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s, layer, slot) for slot in layer.acts]


def _sub_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s if slot == 0 else -s, layer, slot) for slot in layer.acts]


def _mul_vjp(em, layer, inputs, params, s):
    return [unbroadcast(em, s * params["weight"], layer, layer.acts[0])]


def _maxpool_vjp(em, layer, inputs, params, s):
    """Winner takes all: scatter-add ``s`` onto the arg-max positions (overlaps add up)."""
    node = layer.node
    a = inputs[0]
    if a.value is layer.act() and len(node.outputs) == 1:
        # The forward pass already pools this input: let it return the indices too.
        node.outputs.append(gs.Variable(em.fresh("maxpool_indices"), dtype=np.int64))
        indices = node.outputs[1]
    elif a.value is layer.act():
        indices = node.outputs[1]
    else:
        _, indices = em.op("MaxPool", [a], node.attrs, num_outputs=2)
    flat = em.ints([-1])
    a_flat = em.op("Reshape", [a, flat], dtype=em.dtype)
    zeros = em.op(
        "ConstantOfShape",
        [em.shape_of(a_flat)],
        {"value": gs.Constant(em.fresh("zero"), np.zeros(1, dtype=em.dtype))},
        dtype=em.dtype,
    )
    scattered = em.op(
        "ScatterElements",
        [zeros, em.op("Reshape", [indices, flat], dtype=np.int64), em.op("Reshape", [s, flat], dtype=em.dtype)],
        {"axis": 0, "reduction": "add"},
        dtype=em.dtype,
    )
    return [em.sym(em.op("Reshape", [scattered, em.shape_of(layer.act())], dtype=em.dtype))]


def _avgpool_vjp(em, layer, inputs, params, s):
    """Each input position receives the share ``s / divisor`` of every window it lies in.

    Channels are folded into the batch so one single-channel ConvTranspose with a kernel of
    ones spreads the windows back, whatever the channel count.
    """
    node = layer.node
    kernel = list(node.attrs["kernel_shape"])
    window = int(np.prod(kernel))
    if int(node.attrs.get("count_include_pad", 0)):
        scaled = s * (1.0 / window)
    else:
        # divisor = number of real (non-pad) inputs per window = window * AvgPool_cip(ones)
        in_sp = static_shape(layer.act())[2:]
        if None in in_sp:
            raise _dynamic_spatial(layer)
        ones = em.const(np.ones((1, 1, *in_sp)))
        attrs = dict(node.attrs)
        attrs["count_include_pad"] = 1
        frac = em.op("AveragePool", [ones], attrs, dtype=em.dtype)
        scaled = s / (em.sym(frac) * float(window))
    folded_shape = em.op("Concat", [em.ints([-1, 1]), em.dims_of(s.value, 2)], {"axis": 0}, dtype=np.int64)
    folded = em.sym(em.op("Reshape", [scaled, folded_shape], dtype=em.dtype))
    spread = _transposed_window(em, layer, folded, em.const(np.ones((1, 1, *kernel))), kernel, 1)
    return [reshape_back(em, layer, spread)]


def _reduce_count(em: Emitter, a, axes: list[int]) -> Sym:
    dims = em.op("Gather", [em.shape_of(a), em.ints(axes)], {"axis": 0}, dtype=np.int64)
    count = em.op("ReduceProd", [dims], {"keepdims": 0}, dtype=np.int64)
    return em.sym(em.op("Cast", [count], {"to": _float_code(em)}, dtype=em.dtype))


def _float_code(em: Emitter) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(em.dtype)


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
    axes = _reduce_axes(layer.node, rank)
    return _mean_vjp(em, layer, s, axes, bool(layer.node.attrs.get("keepdims", 1)))


def _reducemean_check(node: gs.Node, acts: list[int]) -> str | None:
    shape = static_shape(node.inputs[0])
    if shape is None:
        return "input rank is unknown"
    if _reduce_axes(node, len(shape)) is None:
        return "axes are not constant"
    return None


def _concat_vjp(em, layer, inputs, params, s):
    node = layer.node
    rank = len(static_shape(layer.output))
    axis = int(node.attrs["axis"]) % rank
    sizes = [em.op("Shape", [t], {"start": axis, "end": axis + 1}, dtype=np.int64) for t in node.inputs]
    split = em.op("Concat", sizes, {"axis": 0}, dtype=np.int64)
    parts = em.op("Split", [s, split], {"axis": axis}, num_outputs=len(node.inputs), dtype=em.dtype)
    parts = parts if isinstance(parts, list) else [parts]
    return [em.sym(parts[slot]) for slot in layer.acts]


def _reshape_vjp(em, layer, inputs, params, s):
    return [reshape_back(em, layer, s)]


def _transpose_vjp(em, layer, inputs, params, s):
    perm = layer.node.attrs.get("perm")
    if perm is None:
        perm = list(reversed(range(len(static_shape(layer.act())))))
    inverse = [int(i) for i in np.argsort(perm)]
    return [em.sym(em.op("Transpose", [s], {"perm": inverse}, dtype=em.dtype))]


def _identity_vjp(em, layer, inputs, params, s):
    return [s]


# -- standalone BatchNormalization: y = x * weight + bias per channel -------------------


def _bn_params(node: gs.Node, acts: list[int]):
    scale, bias, mean, var = (constant_value(t) for t in node.inputs[1:5])
    eps = float(node.attrs.get("epsilon", 1e-5))
    weight = scale / np.sqrt(var + eps)
    shift = bias - mean * weight
    rank = len(static_shape(node.inputs[0]) or (0, 0, 0, 0))
    tail = (1,) * max(rank - 2, 0)
    dtype = scale.dtype
    return {
        "weight": gs.Constant(f"{node.outputs[0].name}/lrp_weight", weight.reshape(-1, *tail).astype(dtype)),
        "bias": gs.Constant(f"{node.outputs[0].name}/lrp_bias", shift.reshape(-1, *tail).astype(dtype)),
    }


def _bn_check(node: gs.Node, acts: list[int]) -> str | None:
    if any(constant_value(t) is None for t in node.inputs[1:5]):
        return "its statistics are not constant (training mode)"
    if acts != [0]:
        return "relevance must enter through the data input"
    return None


def _bn_forward(em, layer, inputs, params):
    return inputs[0] * params["weight"] + params["bias"]


def _bn_vjp(em, layer, inputs, params, s):
    return [s * params["weight"]]


# -- the table -----------------------------------------------------------------------

_LINEAR_CONST = _all_constant([1, 2])

_BUILTIN = [
    OpSpec("Conv", Kind.LINEAR, _conv_vjp, params=_const_slots((1, "weight"), (2, "bias")), check=_LINEAR_CONST),
    OpSpec("Gemm", Kind.LINEAR, _gemm_vjp, params=_const_slots((1, "weight"), (2, "bias")), check=_LINEAR_CONST),
    OpSpec("MatMul", Kind.LINEAR, _matmul_vjp, params=_other_operand("weight"), check=_matmul_check),
    OpSpec("Add", Kind.MERGE, _add_vjp, params=_other_operand("bias")),
    OpSpec("Sub", Kind.MERGE, _sub_vjp, params=_other_operand("bias")),
    OpSpec("Sum", Kind.MERGE, _add_vjp),
    OpSpec("Mul", Kind.AFFINE, _mul_vjp, params=_other_operand("weight"), check=_single_relevance_input),
    OpSpec("MaxPool", Kind.POOLING, _maxpool_vjp, linear=False, selects=True),
    OpSpec("AveragePool", Kind.POOLING, _avgpool_vjp),
    OpSpec("GlobalAveragePool", Kind.POOLING, _gap_vjp),
    OpSpec("ReduceMean", Kind.POOLING, _reducemean_vjp, check=_reducemean_check),
    OpSpec("Concat", Kind.MERGE, _concat_vjp),
    OpSpec("Reshape", Kind.RESHAPING, _reshape_vjp, route=vjp_route),
    OpSpec("Flatten", Kind.RESHAPING, _reshape_vjp, route=vjp_route),
    OpSpec("Squeeze", Kind.RESHAPING, _reshape_vjp, route=vjp_route),
    OpSpec("Unsqueeze", Kind.RESHAPING, _reshape_vjp, route=vjp_route),
    OpSpec("Transpose", Kind.RESHAPING, _transpose_vjp, route=vjp_route),
    OpSpec("Identity", Kind.RESHAPING, _identity_vjp, route=identity_route),
    OpSpec("Dropout", Kind.DROPOUT, _identity_vjp, route=identity_route),
    OpSpec(
        "BatchNormalization",
        Kind.NORMALIZATION,
        _bn_vjp,
        forward=_bn_forward,
        params=lambda node, acts: _bn_params(node, acts),
        route=identity_route,
        check=_bn_check,
    ),
]

# ReLU-like activations: relevance passes through unchanged (Zennit's Pass rule).
_ACTIVATIONS = ["Relu", "LeakyRelu", "Clip", "PRelu"]

# Elementwise non-linearities the check names as activations rather than as unknown layers.
KNOWN_ACTIVATION_NAMES = {
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Elu", "Selu", "Celu",
    "Gelu", "Mish", "ThresholdedRelu", "Shrink", "Swish",
}

REGISTRY: dict[str, OpSpec] = {}


def _install_builtins() -> None:
    REGISTRY.clear()
    for spec in _BUILTIN:
        REGISTRY[spec.op_type] = spec
    for op_type in _ACTIVATIONS:
        REGISTRY[op_type] = activation_spec(op_type)


def activation_spec(op_type: str) -> OpSpec:
    return OpSpec(op_type, Kind.ACTIVATION, _identity_vjp, route=identity_route, check=_first_input_only)


def _first_input_only(node: gs.Node, acts: list[int]) -> str | None:
    if acts != [0]:
        return "relevance must enter through the first input"
    return None


def register_layer(
    op_type: str,
    *,
    like: str | None = None,
    vjp: Vjp | None = None,
    forward: Forward | None = None,
    kind: Kind | str = Kind.LINEAR,
    params=None,
    linear: bool = True,
    route: Route | None = None,
) -> OpSpec:
    """Tell lrpc how relevance flows through ``op_type`` (LRP_CONFIG.supports_layer).

    ``like="Reshape"`` reuses a supported op's treatment; otherwise give ``vjp``: a
    function ``(emitter, layer, inputs, params, s) -> [gradient per relevance input]``
    written with :class:`lrpc.symbolic.Sym` arithmetic.
    """
    if like is not None:
        if like not in REGISTRY:
            raise KeyError(f"register_layer: {like!r} is not a supported op type")
        spec = replace(REGISTRY[like], op_type=op_type)
    else:
        if vjp is None:
            raise TypeError("register_layer needs like= or vjp=")
        spec = OpSpec(op_type, Kind(kind), vjp, forward=forward, params=params, linear=linear, route=route)
    REGISTRY[op_type] = spec
    return spec


def register_activation(op_type: str) -> OpSpec:
    """Treat ``op_type`` as a ReLU-like activation (LRP_CONFIG.supports_activation)."""
    spec = activation_spec(op_type)
    REGISTRY[op_type] = spec
    return spec


def unregister(op_type: str) -> None:
    """Forget a registration (built-in ops return to their default treatment)."""
    REGISTRY.pop(op_type, None)
    for spec in _BUILTIN:
        if spec.op_type == op_type:
            REGISTRY[op_type] = spec
    if op_type in _ACTIVATIONS:
        REGISTRY[op_type] = activation_spec(op_type)


def lookup(op_type: str) -> OpSpec | None:
    return REGISTRY.get(op_type)


_install_builtins()
