"""The one graph IR used everywhere: an onnx-graphsurgeon ``gs.Graph`` plus networkx views.

:class:`Program` carries the graph through the pipeline together with the few facts the
passes establish about it: which input is explained, where relevance starts (the logits,
before a stripped softmax) and the file's IR version and opset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .files import LARGE_INITIALIZER_BYTES, default_opset

# onnx-graphsurgeon's own warnings ("colored module is not installed", types it cannot
# convert) and onnxruntime's optimizer warnings while folding ("UnsqueezeElimination cannot
# remove node ...") are about their internals, not the user's model: lrpc reports what
# matters itself (the command line's --verbose shows them again)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
try:
    import onnxruntime as _ort

    _ort.set_default_logger_severity(3)
except ImportError:  # the compiler works without onnxruntime; folding then needs it
    pass

# The compiled file keeps the input's IR version (raised only when its opset needs it)
# and never goes above what current runtimes accept: onnxruntime 1.31 refuses IR 14,
# which onnx 1.23 writes by default.
MAX_IR_VERSION = 13

# Domain of the nodes that stand for a fused exporter pattern during analysis.
FUSED_DOMAIN = "lrpc.fused"


@dataclass
class Program:
    """A graph on its way through the compiler."""

    graph: gs.Graph
    ir_version: int
    opset: int
    input_name: str = ""  # the graph input the caller feeds
    explained_name: str = ""  # the tensor whose relevance is reported (the input, or its embedding)
    output_name: str = ""  # the model output whose class is explained
    start_name: str = ""  # tensor where relevance starts (logits)
    layout: str = "flat"  # how a target picks the explained logit: flat | sequence | dense
    position: int | None = None  # sequence outputs [N, T, V]: the explained position
    notes: list[str] = field(default_factory=list)
    # fused node -> the original nodes with their inputs and outputs (see fuse())
    fused: dict[int, list[tuple[gs.Node, list, list]]] = field(default_factory=dict)
    output_types: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    # a deployed form (quantized, half precision): the input model, whose forward the
    # compiled file runs, while this program is its float analysis twin (lrpc.deployed)
    deployed: onnx.ModelProto | None = None
    # a node's name in the input file -> its name here (dynamo nodes named after their modules)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "Program":
        opset = default_opset(model) or 1
        graph = gs.import_onnx(model)
        program = cls(graph=graph, ir_version=model.ir_version, opset=opset)
        # onnx-graphsurgeon writes any non-tensor output as a sequence of tensors; keep the
        # original types (ZipMap's sequence of maps) to put back on export
        program.output_types = {o.name: _copy(o) for o in model.graph.output if not o.type.HasField("tensor_type")}
        return program

    def rebuilt(self, model: onnx.ModelProto, note: str) -> "Program":
        """A program of ``model`` (this one's graph rewritten as a whole: inlined, converted)
        that keeps what this one knows besides the graph: the deployed file, the notes."""
        new = Program.from_model(model)
        new.ir_version = max(self.ir_version, model.ir_version)
        new.deployed = self.deployed
        new.aliases = dict(self.aliases)
        new.notes = self.notes + [note]
        return new

    # -- fusion: exporter patterns seen as one op, restored before export ------------------
    def fuse(self, nodes: list[gs.Node], op: str, inputs: list, outputs: list, attrs: dict | None = None) -> gs.Node:
        """Replace ``nodes`` by one node of the ``lrpc.fused`` domain (for analysis only).

        Relevance treats the pattern as one op (``x * Sigmoid(x)`` is one SiLU
        activation). :meth:`unfuse` (also run by :meth:`to_model`) puts the original
        nodes back, so the compiled file computes the pattern with the input model's own
        standard ops.
        """
        saved = [(n, list(n.inputs), list(n.outputs)) for n in nodes]
        for n in nodes:
            n.inputs.clear()
            n.outputs.clear()
        ids = {id(n) for n in nodes}
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in ids]
        root = saved[0][0]
        base = (root.name.rsplit("/", 1)[0] + "/" if "/" in (root.name or "") else "") or "/"
        node = gs.Node(op=op, name=f"{base}{op}", domain=FUSED_DOMAIN, inputs=list(inputs),
                       outputs=list(outputs), attrs=dict(attrs or {}))
        self.graph.nodes.append(node)
        self.graph.toposort()
        self.fused[id(node)] = saved
        return node

    def unfuse(self) -> None:
        """Put every fused pattern's original nodes back."""
        for node in [n for n in self.graph.nodes if id(n) in self.fused]:
            saved = self.fused.pop(id(node))
            node.inputs.clear()
            node.outputs.clear()
            self.graph.nodes.remove(node)
            for original, inputs, outputs in saved:
                original.inputs.extend(inputs)
                original.outputs.extend(outputs)
                self.graph.nodes.append(original)
        self.graph.toposort()

    def to_model(self, light: bool = False) -> onnx.ModelProto:
        """The graph as a ModelProto; ``light``: large weights become typed graph inputs
        (for the checker and shape inference, which need their shapes only, at any size).

        Large weights are exported apart from the rest and copied in whole: onnx's
        ``make_graph`` would serialize and parse each of them again (4x slower per GiB)."""
        self.unfuse()
        self.graph.opset = self.opset
        large = [t for t in self.graph.tensors().values()
                 if isinstance(t, gs.Constant) and t.values.nbytes > LARGE_INITIALIZER_BYTES]
        listed = {t.name for t in self.graph.inputs}
        model = self._export_as_inputs(large)
        if not light:
            keep = [i for i in model.graph.input if i.name in listed or i.name not in {t.name for t in large}]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            for t in large:
                model.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.asarray(t.values), t.name))
        for i, out in enumerate(model.graph.output):
            if out.name in self.output_types:
                model.graph.output[i].CopyFrom(self.output_types[out.name])
        # IR 4 is the first that lets initializers stay out of the graph inputs, which is
        # how onnx-graphsurgeon writes them (old files listed weights as inputs).
        model.ir_version = min(max(self.ir_version, _min_ir_for(model), 4), MAX_IR_VERSION)
        return model

    def _export_as_inputs(self, large: list) -> onnx.ModelProto:
        saved = [(t, t.values) for t in large]
        inputs = list(self.graph.inputs)
        try:
            for t, values in saved:
                t.to_variable(dtype=values.dtype, shape=list(values.shape))
                t.type = "tensor_type"  # to_variable leaves out what export_onnx reads
                if t not in self.graph.inputs:
                    self.graph.inputs.append(t)
            return gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for t, values in saved:
                t.to_constant(values)
            self.graph.inputs = inputs

    # -- queries -----------------------------------------------------------------------
    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def runtime_inputs(self) -> list[gs.Variable]:
        """Graph inputs that are real inputs (old files also list their weights as inputs)."""
        return [t for t in self.graph.inputs if not isinstance(t, gs.Constant)]


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _min_ir_for(model: onnx.ModelProto) -> int:
    try:
        return onnx.helper.find_min_ir_version_for(list(model.opset_import))
    except Exception:  # an unknown domain: keep what the model says
        return model.ir_version


def node_graph(graph: gs.Graph) -> nx.DiGraph:
    """Tensor-level dataflow as a networkx graph: nodes are tensor names and ``gs.Node`` ids.

    Edges run tensor -> node (consumer) and node -> tensor (producer). Reachability over
    this graph answers "does this tensor depend on the input" and "does it reach the
    output" in one networkx call each.
    """
    g = nx.DiGraph()
    for node in graph.nodes:
        nid = ("node", id(node))
        g.add_node(nid, node=node)
        for t in node.inputs:
            if t.name:
                g.add_edge(("tensor", t.name), nid)
        for name in outer_reads(node):  # an If/Loop/Scan body reads them: they are its inputs too
            g.add_edge(("tensor", name), nid)
        for t in node.outputs:
            if t.name:
                g.add_edge(nid, ("tensor", t.name))
    return g


def outer_reads(node: gs.Node) -> set[str]:
    """Names an ``If``/``Loop``/``Scan`` node's bodies read from the graph around them (the
    inputs ONNX does not list: a branch computes with the outer graph's tensors)."""
    reads, local = set(), set()
    for body in node.subgraphs(recursive=True):  # nested bodies may read what an outer body makes
        local |= {t.name for t in body.inputs} | {t.name for n in body.nodes for t in n.outputs}
        local |= {t.name for t in body.tensors().values() if isinstance(t, gs.Constant)}
        reads |= {t.name for n in body.nodes for t in n.inputs if t.name}
    return reads - local


def relevance_path(graph: gs.Graph, input_name: str, start_name: str, blocked=None) -> tuple[list[gs.Node], set[str]]:
    """Nodes and tensors on some path from the explained input to the relevance start.

    Returns the nodes in topological order and the names of the tensors that carry
    relevance: those that depend on the input and lead to the start. ``blocked(node,
    slot)`` removes edges relevance never takes (a gate's input to its product).
    """
    g = node_graph(graph)
    if blocked is not None:
        for node in graph.nodes:
            for slot, t in enumerate(node.inputs):
                if t.name and blocked(node, slot):
                    g.remove_edges_from([(("tensor", t.name), ("node", id(node)))])
    src, dst = ("tensor", input_name), ("tensor", start_name)
    if src not in g or dst not in g:
        return [], set()
    on_path = (nx.descendants(g, src) | {src}) & (nx.ancestors(g, dst) | {dst})
    nodes = [n for n in graph.nodes if ("node", id(n)) in on_path]
    carriers = {name for kind, name in on_path if kind == "tensor"}
    return nodes, carriers


def static_shape(tensor) -> tuple | None:
    """The tensor's shape with ints where known and None for dynamic dims; None if unknown."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.values.shape)
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


def dtype_kind(tensor) -> str | None:
    """numpy's kind letter of the tensor's dtype (``"f"``, ``"i"``, ``"b"``, ...); None if unknown."""
    dtype = getattr(tensor, "dtype", None)
    if dtype is None or getattr(tensor, "type", "tensor_type") != "tensor_type":
        return None if dtype is None else "?"
    try:
        return np.dtype(dtype).kind
    except TypeError:  # an ONNX type numpy lacks: bfloat16 and the float8s are floats
        return "f" if isinstance(dtype, int) and dtype != 0 and "FLOAT" in onnx.TensorProto.DataType.Name(dtype) \
            else "?"


def is_float(tensor) -> bool:
    """Whether the tensor can carry relevance: a floating-point dtype, or not known."""
    return dtype_kind(tensor) in (None, "f")


def rounded_from(tensor) -> tuple[object, list]:
    """``(t, roundings)``: the tensor an activation rounding chain ends in ``tensor`` came from,
    looking through ``QuantizeLinear -> DequantizeLinear`` pairs (a QDQ model has one after
    every op; for relevance a rounding is an activation), and the pairs' nodes."""
    roundings = []
    while len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear":
        quantized = tensor.inputs[0].inputs[0]
        if len(quantized.inputs) != 1 or quantized.inputs[0].op != "QuantizeLinear" or len(quantized.outputs) != 1:
            break
        roundings += [tensor.inputs[0], quantized.inputs[0]]
        tensor = quantized.inputs[0].inputs[0]
    return tensor, roundings


def constant_value(tensor) -> np.ndarray | None:
    """The numpy value of an initializer / folded constant, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None
