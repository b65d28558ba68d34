"""The model check: every relevance-carrying node against the support registry.

As in RelevancePropagation.jl, an unknown layer or activation stops compilation with a
summary table instead of silently returning a wrong explanation; ``skip_checks=True``
overrides (at your own risk), and :func:`lrpc.register_layer` /
:func:`lrpc.register_activation` teach lrpc new ops.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .contrib import WHY_FUSED, is_fused_op
from .deployed import is_quantized_op
from .errors import UnsupportedModelError
from .graph import Program, static_shape
from .layers import LayerTable
from .registry import KNOWN_ACTIVATION_NAMES
from .spec import RECURRENT

#: ops with bodies: relevance cannot pass them (an If with a constant condition is inlined first)
CONTROL_FLOW = {"If", "Loop", "Scan"}

SUPPORTED = "supported"
NOT_A_NETWORK = "not a network"


@dataclass
class CheckRow:
    index: str  # layer index, "" for activations and unknown nodes
    name: str
    op_type: str
    kind: str
    status: str  # "supported" or the reason

    @property
    def ok(self) -> bool:
        return self.status == SUPPORTED


@dataclass
class CheckReport:
    rows: list[CheckRow]
    input_name: str
    start_name: str
    exact: bool = False  # the check of a gradient method (every op needs its exact derivative)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.ok]

    def table(self, only_failures: bool = False) -> Table:
        what = "gradient" if self.exact else "relevance"
        table = Table(title=escape(f"{'Gradient' if self.exact else 'LRP'} model check: {what} from "
                                   f"{self.start_name!r} to {self.input_name!r}"))
        for column in ("#", "node", "op", "kind", "status"):
            table.add_column(column)
        for r in self.rows:
            if only_failures and r.ok:
                continue
            style = None if r.ok else "bold red"
            table.add_row(*(escape(v) for v in (r.index, r.name, r.op_type, r.kind, r.status)), style=style)
        return table

    def render(self, only_failures: bool = False) -> str:
        """The table as text at its natural width: node names and reasons are never wrapped."""
        from rich.measure import Measurement

        table = self.table(only_failures)
        probe = Console(file=io.StringIO(), width=10_000)
        width = Measurement.get(probe, probe.options, table).maximum
        buffer = io.StringIO()
        Console(file=buffer, width=max(width, 80), no_color=True, highlight=False).print(table)
        return buffer.getvalue().rstrip()


def check_layers(program: Program, table: LayerTable) -> CheckReport:
    rows: list[CheckRow] = []
    unknown = {id(n) for n in table.unknown}
    for node in table.nodes:
        name = node.name or node.op
        if id(node) in unknown:
            if node.op in KNOWN_ACTIVATION_NAMES:
                reason = f"unsupported or unknown activation function {node.op}"
                kind = "activation"
            elif node.domain == "ai.onnx.ml":
                reason = f"LRP explains neural networks; {node.op} (ai.onnx.ml) is not a neural-network layer"
                kind = NOT_A_NETWORK
            elif node.op in CONTROL_FLOW and not node.domain:
                reason = (f"control flow: relevance through an {node.op}'s body is not supported (its condition "
                          "or trip count is computed at run time; a constant one is inlined)")
                kind = "control flow"
            elif node.op in RECURRENT and not node.domain:
                why = node.attrs.get(WHY_FUSED)
                reason = f"recurrent layer {node.op} not written out in time steps" + (f": {why}" if why else "")
                kind = "recurrent"
            elif (is_fused_op(node.domain or "") and not is_quantized_op(node.op)) or WHY_FUSED in node.attrs:
                why = node.attrs.get(WHY_FUSED)
                reason = f"{node.domain or 'ai.onnx'}.{node.op}: fused op without a rule" + (f" ({why})" if why else "")
                kind = "fused"
            elif is_quantized_op(node.op):
                reason = f"{node.op}: quantized op without a rule"
                kind = "quantized"
            else:
                reason = "unknown layer type"
                kind = "?"
            rows.append(CheckRow("", name, node.op, kind, reason))
            continue
        layer = table.by_node[id(node)]
        problem = layer.spec.problem(node, layer.acts, table.exact)
        index = "" if layer.index < 0 else str(layer.index)
        rows.append(CheckRow(index, name, node.op, layer.kind.value, problem or SUPPORTED))
    start = program.graph.tensors().get(program.start_name)
    shape = static_shape(start) if start is not None else None
    if shape is not None and len(shape) < 2:
        rows.append(
            CheckRow("", program.start_name, "(output)", "output",
                     f"relevance start must be [batch, classes, ...], got rank {len(shape)}")
        )
    if not table.nodes:
        reason = (
            "the model has no layers between its input and the stripped softmax: nothing to explain"
            if program.start_name == program.explained_name
            else f"the output {program.start_name!r} does not depend on this input"
        )
        rows.append(CheckRow("", program.explained_name, "(input)", "input", reason))
    return CheckReport(rows, program.explained_name, program.start_name, exact=table.exact)


def not_a_network(report: CheckReport) -> str | None:
    """The one line for a model that is no neural network (a tree ensemble, a linear model),
    or None."""
    if report.failures and all(r.kind == NOT_A_NETWORK for r in report.failures):
        ops = ", ".join(sorted({r.op_type for r in report.failures}))
        return f"LRP explains neural networks; this model is a {ops} (ai.onnx.ml), not one"
    return None


def raise_if_unsupported(report: CheckReport, verbose: bool = True) -> None:
    if report.ok:
        return
    n = len(report.failures)
    if not_a_network(report):
        raise UnsupportedModelError(not_a_network(report))
    nodes = f"{n} node{'s' if n != 1 else ''}"
    if report.exact:
        summary = (f"gradient model check failed: {nodes} lrpc knows no exact derivative of; register them "
                   "with a derivative (lrpc.register_activation(op, derivative) / lrpc.register_layer), or pass "
                   "skip_checks=True at your own risk.")
    else:
        summary = (
            f"LRP model check failed: {nodes} lrpc cannot propagate relevance through. "
            "LRP assumes a deep rectifier network; register new ops with lrpc.register_layer / "
            "lrpc.register_activation, or pass skip_checks=True at your own risk."
        )
    message = f"{report.render(only_failures=True)}\n{summary}" if verbose else summary
    raise UnsupportedModelError(message, report)

