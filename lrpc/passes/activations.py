"""Elementwise activations recognized by what they compute, whatever their spelling.

The literal patterns of :mod:`lrpc.passes.fusion` know the exporters' own spellings. Graph
simplifiers fold constants through them, though. onnxsim moves GELU's final ``· ½`` into the
next convolution's weights, so the graph computes ``x · (1 + erf(x/√2))``. Others divide by
√2 instead of multiplying by 1/√2, or fold ``√(2/π) · 0.044715`` into one constant. These
are still one activation for relevance.

This pass takes every ``Erf``, ``Tanh``, ``Sigmoid``, ``HardSigmoid`` or ``Clip`` that the
patterns left, and looks at the elementwise subgraph around it, built from scalar
constants only:
- its input ``x`` is the tensor all of the subgraph's values come from;
- its output ``y`` is reached by following the seed's elementwise consumers.

The subgraph is evaluated on a grid of values of ``x`` (float64, −8…8). When it equals
``k · f(x)`` for one of the functions below, with a constant ``k`` (the folded ``½``), it
becomes that activation. It is matched by value, not by literal constants, so an
arbitrary spelling can't slip through: ``x · (1 + erf(x))`` is not a GELU and stays
refused.

A scaled activation passes relevance as the activation does (the constant scale is a
bias-free linear map). The fused node exists during analysis only; the compiled file
keeps the original nodes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value
from ..spec import SHAPE_READERS
from .fusion import _Pattern

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


#: (fused op, its attributes, the function it computes)
FUNCTIONS = [
    ("Gelu", {}, lambda x: 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)))),
    ("Gelu", {"approximate": "tanh"},
     lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))),
    ("SiLU", {}, lambda x: x * _sigmoid(x)),
    ("HardSwish", {}, lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)),
    ("Mish", {}, lambda x: x * np.tanh(_softplus(x))),
]
#: the ops an activation's subgraph is written with (each on the subgraph's own values and
#: scalar constants), evaluated in numpy
_EVAL = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b), "Sqrt": np.sqrt, "Neg": np.negative, "Reciprocal": lambda a: 1.0 / a,
    "Erf": _ERF, "Tanh": np.tanh, "Sigmoid": _sigmoid, "Softplus": _softplus, "Relu": lambda a: np.maximum(a, 0.0),
    "Exp": np.exp, "Identity": lambda a: a, "Max": np.maximum, "Min": np.minimum,
}
SEEDS = {"Erf", "Tanh", "Sigmoid", "HardSigmoid", "Clip"}
#: how far the output may lie from the seed (a GELU: Erf → Add → Mul → Mul)
REACH = 6
GRID = np.linspace(-8.0, 8.0, 321)
TOLERANCE = 1e-5


def _is_elementwise(node: gs.Node) -> bool:
    if node.op not in _EVAL and node.op not in ("Clip", "HardSigmoid", "Cast"):
        return False
    constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
    return all(t.values.size == 1 for t in constants)


class _Subgraph:
    """The values of tensors computed elementwise from one free tensor ``x``."""

    def __init__(self, x):
        self.x, self.nodes, self.values = x, [], {}

    def value(self, tensor, depth: int = 0) -> np.ndarray | None:
        if tensor is self.x:
            return GRID
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values, np.float64).reshape(())
        if id(tensor) in self.values:
            return self.values[id(tensor)]
        if depth > 24 or len(tensor.inputs) != 1 or not _is_elementwise(tensor.inputs[0]):
            return None
        node = tensor.inputs[0]
        args = []
        for t in node.inputs:
            if not t.name:
                args.append(None)
                continue
            v = self.value(t, depth + 1)
            if v is None:
                return None
            args.append(v)
        with np.errstate(all="ignore"):
            out = _apply(node, args)
        if out is None:
            return None
        self.values[id(tensor)] = out
        self.nodes.append(node)
        return out


def _apply(node: gs.Node, args: list) -> np.ndarray | None:
    if node.op == "Clip":
        low = args[1] if len(args) > 1 and args[1] is not None else node.attrs.get("min", -np.inf)
        high = args[2] if len(args) > 2 and args[2] is not None else node.attrs.get("max", np.inf)
        return np.clip(args[0], low, high)
    if node.op == "HardSigmoid":
        return np.clip(float(node.attrs.get("alpha", 0.2)) * args[0] + float(node.attrs.get("beta", 0.5)), 0.0, 1.0)
    if node.op == "Cast":
        return args[0]
    return _EVAL[node.op](*args)


def _candidate_inputs(seed: gs.Node) -> list:
    """Tensors the seed's input is computed from elementwise, nearest last: each may be
    the activation's ``x`` (a bias ``Add`` before it ends the walk: its bias is a vector)."""
    found, seen, level = [], set(), [seed.inputs[0]]
    for _ in range(REACH + 2):  # a GELU's x lies 5 ops above its Tanh; an LSTM's chain of cells would not end
        following = []
        for t in level:
            if id(t) in seen or isinstance(t, gs.Constant):
                continue
            seen.add(id(t))
            found.append(t)
            if len(t.inputs) == 1 and _is_elementwise(t.inputs[0]):
                following.extend(x for x in t.inputs[0].inputs if x.name and not isinstance(x, gs.Constant))
        level = following
    return found[::-1]


def _candidate_outputs(seed: gs.Node) -> list:
    """Tensors reached from the seed through single elementwise consumers, farthest first."""
    found, tensor = [], seed.outputs[0]
    for _ in range(REACH):
        consumers = [c for c in tensor.outputs if c.op not in SHAPE_READERS]
        if len(consumers) != 1 or not _is_elementwise(consumers[0]) or not consumers[0].outputs:
            break
        tensor = consumers[0].outputs[0]
        found.append(tensor)
    return found[::-1]


def _match(y: np.ndarray) -> tuple[str, dict] | None:
    if y.shape != GRID.shape or not np.all(np.isfinite(y)):
        return None
    for op, attrs, fn in FUNCTIONS:
        f = fn(GRID)
        scale = float(np.dot(y, f) / np.dot(f, f))
        if scale != 0.0 and np.abs(y - scale * f).max() <= TOLERANCE * abs(scale) * np.abs(f).max():
            return op, attrs
    return None


def fuse_activations_by_value(program: Program) -> Program:
    """Erf/Tanh/Sigmoid/HardSigmoid/Clip subgraphs that compute a GELU (either form), SiLU,
    HardSwish or Mish, up to a constant factor, become that activation."""
    graph_outputs = {t.name for t in program.graph.outputs}
    for seed in [n for n in program.graph.nodes if n.op in SEEDS]:
        if not seed.outputs or not seed.inputs:  # swallowed by an earlier match
            continue
        found = _find(seed, graph_outputs)
        if found is None:
            continue
        op, attrs, x, y, nodes = found
        program.fuse(nodes, op, [x], [y], attrs)
        program.notes.append(f"fused {len(nodes)} nodes into {op} at {y.name!r} (recognized by value)")
    return program


def _covers_privately(nodes: list[gs.Node], output, graph_outputs: set) -> bool:
    """The literal patterns' test (:meth:`lrpc.passes.fusion._Pattern.private`): every tensor
    made inside, but the output, is used only inside."""
    pattern = _Pattern(output.inputs[0])
    pattern.nodes = list(nodes)
    return pattern.private(graph_outputs)


def _find(seed: gs.Node, graph_outputs: set):
    """The largest subgraph around ``seed`` that is an activation: ``(op, attrs, x, y, nodes)``."""
    for y in _candidate_outputs(seed) + [seed.outputs[0]]:
        for x in _candidate_inputs(seed):
            sub = _Subgraph(x)
            values = sub.value(y)
            if values is None or seed not in sub.nodes:
                continue
            matched = _match(np.broadcast_to(values, GRID.shape).astype(np.float64))
            if matched is not None and _covers_privately(sub.nodes, y, graph_outputs):
                return (*matched, x, y, sub.nodes)
    return None
