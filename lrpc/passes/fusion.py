"""Exporter patterns fused back into one op: HardSwish, SiLU, GELU (erf and tanh forms),
LayerNorm written out as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, RMSNorm as
Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul.

Old exporters (and some new ones, below the opset that has the op) spell these
functions with primitive ops. For relevance they are one activation (or one
normalization layer): their relevance passes through as a whole, and the check and
``inspect`` name them. Each pass matches its pattern from the pattern's last node
backwards; products and sums are matched as multisets of factors/terms, so operand
order and nesting (``x * 0.5 * (...)`` or ``(x * (...)) * 0.5``) do not matter.

The fused node exists during analysis only (:meth:`lrpc.graph.Program.fuse`): the
compiled file keeps the original nodes, so its forward pass is the input model's.

Why not onnxscript's rewriter (``onnxscript.rewriter.pattern``, which has RMSNorm and
attention fusions of its own): it rewrites ``onnx_ir`` graphs permanently into
onnxruntime's contrib ops, while lrpc works on onnx-graphsurgeon graphs and needs each
fusion undone on export (the compiled file computes the model's own standard ops). Using
it would mean an IR round trip per pass plus the restore bookkeeping kept here anyway.
Attention itself is not fused: its MatMuls and Softmax are explained op by op.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value, rounded_from
from ..spec import SHAPE_READERS


class _Pattern:
    """Bookkeeping for one match attempt: the nodes it covers and the output it ends in."""

    def __init__(self, root: gs.Node):
        self.root = root
        self.nodes: list[gs.Node] = [root]
        self.subgraph_nodes: set[int] = set()  # nodes inside a covered If's branches

    def producer(self, tensor, op: str | tuple) -> gs.Node | None:
        """The node producing ``tensor`` if it is an ``op`` node; it joins the pattern.

        Activation roundings (``QuantizeLinear -> DequantizeLinear``, which a QDQ model has
        after every op) are looked through and join the pattern too: a GELU whose
        intermediate values are rounded to int8 is still one GELU for relevance, and the
        compiled file keeps the rounded nodes for its forward pass."""
        ops = (op,) if isinstance(op, str) else op
        tensor, roundings = rounded_from(tensor)
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ops:
            return None
        node = tensor.inputs[0]
        for joined in roundings + [node]:
            if joined not in self.nodes:
                self.nodes.append(joined)
        return node

    def spread(self, tensor, op: str) -> list:
        """Operands of a tree of ``op`` (Mul or Add) nodes ending in ``tensor``."""
        node = self.producer(tensor, op) if tensor is not self.root.outputs[0] else self.root
        if node is None or node.op != op:
            return [tensor]
        return [leaf for t in node.inputs for leaf in self.spread(t, op)]

    def operands(self, tensor, op: str) -> list:
        """The inputs of the ``op`` node producing ``tensor`` (one level; it joins the
        pattern), or ``[tensor]``: where an operand may itself be a sum or a product that
        belongs to the input (a GELU's ``x`` is often a layer's bias ``Add``)."""
        node = self.producer(tensor, op)
        return [tensor] if node is None else list(node.inputs)

    def attempts(self, candidates):
        """Iterate over alternatives; nodes an abandoned alternative visited are dropped."""
        mark = len(self.nodes)
        for candidate in candidates:
            del self.nodes[mark:]
            yield candidate
        del self.nodes[mark:]

    def private(self, graph_outputs: set) -> bool:
        """Every tensor made inside the pattern is used only inside it (or only for its
        shape: exporters compute reshape targets from intermediate shapes)."""
        inside = {id(n) for n in self.nodes} | self.subgraph_nodes
        for node in self.nodes:
            if node is self.root:
                continue
            for t in node.outputs:
                outside = [c for c in t.outputs if id(c) not in inside and c.op not in SHAPE_READERS]
                if t.name in graph_outputs or outside:
                    return False
        return True


def _scalar(tensor, value: float, rtol: float = 1e-3) -> bool:
    v = constant_value(tensor)
    return v is not None and v.size == 1 and math.isclose(float(v.ravel()[0]), value, rel_tol=rtol, abs_tol=1e-7)


def _take(operands: list, predicate) -> object | None:
    """Remove and return the first operand satisfying ``predicate``."""
    for i, t in enumerate(operands):
        if predicate(t):
            return operands.pop(i)
    return None


def _silu(p: _Pattern):
    factors = p.spread(p.root.outputs[0], "Mul")
    if len(factors) != 2:
        return None
    for x, s in p.attempts((factors, factors[::-1])):
        sigmoid = p.producer(s, "Sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is x:
            return "SiLU", x, {}
    return None


def _hardswish(p: _Pattern):
    factors = p.spread(p.root.outputs[0], "Mul")
    for x in p.attempts(list(factors)):
        rest = [f for f in factors if f is not x]
        if len(rest) == 1:  # x * HardSigmoid(x) with torch's slope
            hs = p.producer(rest[0], "HardSigmoid")
            if hs is not None and hs.inputs[0] is x and math.isclose(hs.attrs.get("alpha", 0.2), 1 / 6, rel_tol=1e-3) \
                    and math.isclose(hs.attrs.get("beta", 0.5), 0.5, rel_tol=1e-3):
                return "HardSwish", x, {}
        if len(rest) == 2:  # x * Clip(x + 3, 0, 6) * (1/6)
            if _take(rest, lambda t: _scalar(t, 1 / 6)) is None:
                continue
            clip = p.producer(rest[0], "Clip")
            if clip is None or len(clip.inputs) < 3 or not (_scalar(clip.inputs[1], 0) and _scalar(clip.inputs[2], 6)):
                continue
            terms = p.operands(clip.inputs[0], "Add")
            if len(terms) == 2 and _take(terms, lambda t: _scalar(t, 3)) is not None and terms[0] is x:
                return "HardSwish", x, {}
    return None


def _gelu(p: _Pattern):
    """0.5 · x · (1 + erf(x / √2))  or  0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))."""
    factors = p.spread(p.root.outputs[0], "Mul")
    if len(factors) != 3 or _take(factors, lambda t: _scalar(t, 0.5)) is None:
        return None
    for x, rest in p.attempts(((factors[0], factors[1]), (factors[1], factors[0]))):
        terms = p.spread(rest, "Add")
        if len(terms) != 2 or _take(terms, lambda t: _scalar(t, 1.0)) is None:
            continue
        erf = p.producer(terms[0], "Erf")
        if erf is not None:
            inner = p.operands(erf.inputs[0], "Mul")
            if len(inner) == 2 and _take(inner, lambda t: _scalar(t, 1 / math.sqrt(2))) is not None and inner[0] is x:
                return "Gelu", x, {}
            continue
        tanh = p.producer(terms[0], "Tanh")
        if tanh is None:
            continue
        inner = p.operands(tanh.inputs[0], "Mul")
        if len(inner) != 2 or _take(inner, lambda t: _scalar(t, math.sqrt(2 / math.pi))) is None:
            continue
        cubic = p.operands(inner[0], "Add")
        if len(cubic) != 2 or x not in cubic:
            continue
        other = cubic[1] if cubic[0] is x else cubic[0]
        scaled = p.spread(other, "Mul")
        if _take(scaled, lambda t: _scalar(t, 0.044715)) is None:
            continue
        if scaled == [x, x, x] or (len(scaled) == 1 and _is_cube(p, scaled[0], x)):
            return "Gelu", x, {"approximate": "tanh"}
    return None


def _is_cube(p: _Pattern, tensor, x) -> bool:
    power = p.producer(tensor, "Pow")
    return power is not None and power.inputs[0] is x and _scalar(power.inputs[1], 3.0)


def _layernorm(p: _Pattern):
    """(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps), over the last axes."""
    if p.root.op != "Div":
        return None
    centered, std = p.root.inputs
    sub = p.producer(centered, "Sub")
    sqrt = p.producer(std, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x, mean = sub.inputs
    mean_node = p.producer(mean, "ReduceMean")
    if mean_node is None or mean_node.inputs[0] is not x:
        return None
    terms = p.spread(sqrt.inputs[0], "Add")
    if len(terms) != 2:
        return None
    eps = next((constant_value(t) for t in terms if constant_value(t) is not None), None)
    var = next((t for t in terms if constant_value(t) is None), None)
    var_node = p.producer(var, "ReduceMean") if var is not None else None
    if eps is None or var_node is None:
        return None
    square = var_node.inputs[0]
    pow_node = p.producer(square, ("Pow", "Mul"))
    if pow_node is None or pow_node.inputs[0] is not centered:
        return None
    if pow_node.op == "Pow" and not _scalar(pow_node.inputs[1], 2.0):
        return None
    if pow_node.op == "Mul" and pow_node.inputs[1] is not centered:
        return None
    axes = [_axes(mean_node), _axes(var_node)]
    if None in axes or axes[0] != axes[1]:
        return None
    return "LayerNormalization", x, {"axis": min(axes[0]), "epsilon": float(np.ravel(eps)[0])}


def _rmsnorm(p: _Pattern):
    """x · 1/√(mean(x²) + eps): ``Mul`` by ``Reciprocal``/``Div(1, ·)`` of the root, or ``Div``
    by it, over the last axes (the scale γ stays a separate ``Mul``)."""
    root = p.root
    candidates = [tuple(root.inputs)] if root.op == "Div" else [tuple(root.inputs), tuple(reversed(root.inputs))]
    for x, scale in p.attempts(candidates):
        if root.op == "Div":
            sqrt = p.producer(scale, "Sqrt")
        else:
            inverse = p.producer(scale, ("Reciprocal", "Div"))
            if inverse is None or (inverse.op == "Div" and not _scalar(inverse.inputs[0], 1.0)):
                continue
            sqrt = p.producer(inverse.inputs[-1], "Sqrt")
        if sqrt is None:
            continue
        terms = p.spread(sqrt.inputs[0], "Add")
        eps = next((constant_value(t) for t in terms if constant_value(t) is not None), None)
        mean = next((t for t in terms if constant_value(t) is None), None)
        mean_node = p.producer(mean, "ReduceMean") if len(terms) == 2 and mean is not None else None
        if eps is None or mean_node is None:
            continue
        square = p.producer(mean_node.inputs[0], ("Pow", "Mul"))
        if square is None or square.inputs[0] is not x:
            continue
        if (square.op == "Pow" and not _scalar(square.inputs[1], 2.0)) or (square.op == "Mul" and square.inputs[1] is not x):
            continue
        axes = _axes(mean_node)
        if axes is None:
            continue
        return "RMSNormalization", x, {"axis": min(axes), "epsilon": float(np.ravel(eps)[0])}
    return None


# single-input ops torch puts between x² and the window sum of its LRN decomposition
_LRN_WINDOW_OPS = ("Reshape", "Pad", "AveragePool", "Squeeze", "Unsqueeze", "Transpose", "Identity")


def _lrn(p: _Pattern):
    """x / (k + alpha · avgpool_window(x²))^beta: torch's LocalResponseNorm, spelled out."""
    if p.root.op != "Div":
        return None
    x, denominator = p.root.inputs
    power = p.producer(denominator, "Pow")
    if power is None or constant_value(power.inputs[1]) is None:
        return None
    terms = p.spread(power.inputs[0], "Add")
    if len(terms) != 2 or _take(terms, lambda t: constant_value(t) is not None and constant_value(t).size == 1) is None:
        return None
    factors = p.spread(terms[0], "Mul")
    if len(factors) != 2 or _take(factors, lambda t: constant_value(t) is not None and constant_value(t).size == 1) is None:
        return None
    tensor, window = factors[0], False
    while True:
        node = p.producer(tensor, _LRN_WINDOW_OPS + ("Mul", "Pow", "If"))
        if node is None:
            return None
        if node.op == "If":  # the legacy exporter squeezes through an If on a shape test
            tensor = _if_passthrough(p, node)
            if tensor is None:
                return None
            continue
        if node.op == "Mul":
            return ("LRN", x, {}) if window and list(node.inputs) == [x, x] else None
        if node.op == "Pow":
            return ("LRN", x, {}) if window and node.inputs[0] is x and _scalar(node.inputs[1], 2.0) else None
        window = window or node.op == "AveragePool"
        tensor = node.inputs[0]


def _if_passthrough(p: _Pattern, node: gs.Node):
    """The outer tensor an If only reshapes (each branch one Squeeze/Identity/Reshape of it)."""
    sources = set()
    for key in ("then_branch", "else_branch"):
        branch = node.attrs.get(key)
        if branch is None or len(branch.nodes) != 1 or branch.nodes[0].op not in ("Squeeze", "Identity", "Reshape"):
            return None
        inner = branch.nodes[0]
        outer = [t for t in inner.inputs if t.name and not isinstance(t, gs.Constant) and t not in branch.inputs]
        if len(outer) < 1:
            return None
        sources.add(id(outer[0]))
        p.subgraph_nodes.add(id(inner))
        source = outer[0]
    return source if len(sources) == 1 else None


def _axes(node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1:
        value = constant_value(node.inputs[1])
        return None if value is None else sorted(int(a) for a in np.ravel(value))
    axes = node.attrs.get("axes")
    return sorted(int(a) for a in axes) if axes is not None else None


def _fuse_pattern(program: Program, roots: tuple, matcher) -> Program:
    outputs = {t.name for t in program.graph.outputs}
    for root in [n for n in program.graph.nodes if n.op in roots]:
        if not root.outputs:  # already swallowed by an earlier match
            continue
        pattern = _Pattern(root)
        found = matcher(pattern)
        if found is None or not pattern.private(outputs):
            continue
        op, x, attrs = found
        output = root.outputs[0]
        program.fuse(pattern.nodes, op, [x], [output], attrs)
        program.notes.append(f"fused {len(pattern.nodes)} nodes into {op} at {output.name!r}")
    return program


def fuse_silu(program: Program) -> Program:
    """``x * Sigmoid(x)`` -> SiLU."""
    return _fuse_pattern(program, ("Mul",), _silu)


def fuse_hardswish(program: Program) -> Program:
    """``x * Clip(x + 3, 0, 6) / 6`` or ``x * HardSigmoid(x)`` -> HardSwish."""
    return _fuse_pattern(program, ("Mul",), _hardswish)


def fuse_gelu(program: Program) -> Program:
    """GELU in its Erf and Tanh forms -> Gelu."""
    return _fuse_pattern(program, ("Mul",), _gelu)


def fuse_lrn(program: Program) -> Program:
    """LocalResponseNorm written with Mul/Pad/AveragePool/Pow/Div -> LRN."""
    return _fuse_pattern(program, ("Div",), _lrn)


def fuse_rmsnorm(program: Program) -> Program:
    """RMSNorm written with Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul -> RMSNormalization."""
    return _fuse_pattern(program, ("Mul", "Div"), _rmsnorm)


def fuse_layernorm(program: Program) -> Program:
    """LayerNorm written with ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div -> LayerNormalization."""
    return _fuse_pattern(program, ("Div",), _layernorm)
