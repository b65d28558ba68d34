"""Emit the relevance backward pass as ONNX nodes appended to the forward graph.

Relevance starts as a one-hot of the target class at the logits (times the logit when
``normalize_output_relevance`` is off), then walks the relevance-carrying nodes in
reverse topological order. Each node's output relevance is the sum of what its
consumers sent back (fan-out sums); its rule turns that into relevance for each of its
relevance inputs. Activations pass relevance through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from .crp import Features, mask_features, tile_batch
from .errors import LrpcError, UnsupportedModelError
from .graph import Program, node_graph, static_shape
from .layers import LayerTable
from .spec import TRANSPARENT, Layer
from .rules import Rule
from .symbolic import Emitter, Sym, add_all

TARGET_NAME = "lrp_target"
RELEVANCE_NAME = "relevance"
REGION_NAME = "lrp_region"
LOGIT_NAME = "lrp_logit"
CLASS_NAME = "lrp_class"
REPORT_NAME = "lrp_report"
FEATURES_NAME = "crp_features"
RELEVANCE_AT_PREFIX = "relevance_at:"


@dataclass
class Emitted:
    """What the backward pass added to the graph's interface."""

    target: gs.Variable
    relevance: gs.Variable
    extra_outputs: list[gs.Variable] = field(default_factory=list)
    region: gs.Variable | None = None  # dense outputs: where the explained channel counts


@dataclass
class ConceptSpec:
    """CRP: explain these features of this layer's output (see :mod:`lrpc.crp`)."""

    layer: Layer
    features: Features


def emit_relevance(
    program: Program,
    table: LayerTable,
    rules: list[Rule],
    normalize_output_relevance: bool = True,
    relevance_at: list[gs.Tensor] = (),
    concept: ConceptSpec | None = None,
    report: bool = False,
    labels: bool = False,
    targets: int = 1,
) -> Emitted:
    """Append the backward pass; returns the new input and outputs. ``report``: also the
    per-layer relevance sums (``lrp_report``) that :class:`lrpc.report.ConservationReport`
    reads. ``labels``: also the class each row explains and its logit (``lrp_class``,
    ``lrp_logit``). ``targets``: K > 1 explains K classes per sample in one call
    (:func:`_several_targets`)."""
    graph, tensors, x, logits, dtype, em = _ends(program)
    target = gs.Variable(TARGET_NAME, dtype=np.int64, shape=["lrp_targets"])
    if report and concept is not None:
        raise LrpcError("a conservation report is for LRP runs, not CRP")
    backward = _Backward(em, rules, {t.name for t in relevance_at}, report=report)

    region = None
    if program.layout == "dense":
        rank = len(static_shape(logits))
        region = gs.Variable(REGION_NAME, dtype=dtype, shape=["lrp_region_batch", 1, *[f"r{i}" for i in range(rank - 2)]])
    if targets > 1:
        if concept is not None or report or relevance_at:
            raise LrpcError("several targets per call do not combine with CRP, --report or --relevance-at")
        target = gs.Variable(TARGET_NAME, dtype=np.int64, shape=["lrp_batch", targets])
        return _several_targets(em, program, table, rules, target, targets, normalize_output_relevance, region,
                                labels, x, tensors)
    start = _output_relevance(em, logits, _per_sample(em, target, logits), normalize_output_relevance, program, region)
    explained_logit, chosen = start.logit, start.chosen
    pending: dict[str, list[Sym]] = _seed(em, program, table, backward, logits, start,
                                          concept.layer.node if concept is not None else None)
    # the class each row explains (the arg-max resolved) and its logit: what a caller,
    # a server above all, needs to label the relevance
    extra: list[gs.Variable] = [_named_output(graph, chosen, CLASS_NAME, np.int64, ["batch"]),
                                _named_output(graph, explained_logit.value, LOGIT_NAME, dtype, ["batch"])] \
        if labels else []
    if concept is None:
        pending = backward.run(table.nodes, table, pending)
        x_final, shape = x, x.shape
    else:
        at = concept.layer.output
        pending = backward.run(table.nodes, table, pending, stop_after=concept.layer.node)
        if not pending.get(at.name):
            raise LrpcError(f"no relevance reaches the CRP layer {concept.layer.describe()}")
        masked, indices = mask_features(em, add_all(pending[at.name]), at, concept.features)
        times = concept.features.count()
        x_final = tile_batch(em, x, times)
        lower, lower_table = _clone_below(program, table, x, x_final, at)
        pending = backward.run(lower, lower_table, {lower_table.renamed[at.name]: [masked]},
                               original_names=lower_table.original_names)
        shape = ["crp_batch", *x.shape[1:]]
        extra.append(_named_output(graph, indices, FEATURES_NAME, np.int64, [times, "batch"]))

    parts = pending.get(x_final.name)
    if not parts:
        raise LrpcError(f"no relevance reaches input {x.name!r}")
    relevance = _named_output(graph, add_all(parts).value, _relevance_name(tensors), dtype, shape)
    for tensor in relevance_at:
        captured = backward.captured.get(tensor.name)
        if captured is None:
            raise LrpcError(f"--relevance-at {tensor.name!r}: no relevance passes there")
        rank = len(tensor.shape) if tensor.shape is not None else 0
        shape = [f"d{i}" for i in range(rank)] if rank else None
        extra.append(_named_output(graph, captured.value, RELEVANCE_AT_PREFIX + tensor.name, dtype, shape))
    if report:
        layers = len(table.layers)
        extra.append(_named_output(graph, backward.report_tensor(layers, x), REPORT_NAME, dtype, ["batch", layers, 2]))
    return Emitted(target, relevance, extra, region)


def _several_targets(em: Emitter, program: Program, table, rules, target, k: int, normalize: bool, region, labels,
                     x, tensors) -> Emitted:
    """K classes per sample in one call: ``lrp_target`` ``[N, K]`` (-1 in column j: the
    sample's j-th highest-scoring class; the default, empty, is all -1: the top K), and
    ``relevance`` ``[K·N, ...]``, target-major (rows ``j·N .. j·N+N-1`` explain column j).

    The backward pass is emitted once per column from the same forward pass; the rule's
    denominators and modified weights are the same nodes in every copy: the emitter builds
    each of them once (it reuses a node whose op, inputs and attributes it has already
    written), so they are computed once and only the relevance passes run K times."""
    logits = tensors[program.start_name]
    parts, chosen_all, logit_all = [], [], []
    for column in _target_columns(em, program, logits, target, k, region):
        start = _output_relevance(em, logits, column, normalize, program, region)
        logit, chosen = start.logit, start.chosen
        backward = _Backward(em, rules, set())
        pending = backward.run(table.nodes, table, _seed(em, program, table, backward, logits, start))
        if not pending.get(x.name):
            raise LrpcError(f"no relevance reaches input {x.name!r}")
        parts.append(add_all(pending[x.name]).value)
        chosen_all.append(chosen)
        logit_all.append(logit.value)
    relevance = _named_output(em.graph, em.op("Concat", parts, {"axis": 0}, dtype=em.dtype),
                              _relevance_name(tensors), em.dtype, ["lrp_rows", *x.shape[1:]])
    return Emitted(target, relevance, _row_labels(em, chosen_all, logit_all) if labels else [], region)


def _row_labels(em: Emitter, chosen_all: list, logit_all: list) -> list[gs.Variable]:
    """``lrp_class`` and ``lrp_logit`` of K target-major row blocks."""
    def joined(parts, dtype):
        return parts[0] if len(parts) == 1 else em.op("Concat", parts, {"axis": 0}, dtype=dtype)

    return [_named_output(em.graph, joined(chosen_all, np.int64), CLASS_NAME, np.int64, ["lrp_rows"]),
            _named_output(em.graph, joined(logit_all, em.dtype), LOGIT_NAME, em.dtype, ["lrp_rows"])]


def _target_columns(em: Emitter, program: Program, logits, target, k: int, region) -> list:
    """``lrp_target`` ``[N, K]`` as K columns ``[N]`` of classes, -1 in column j resolved to
    the sample's j-th highest-scoring class."""
    shape = static_shape(logits) or ()
    known = {"flat": shape[1:], "sequence": shape[2:], "dense": shape[1:2]}.get(program.layout, ())
    classes = int(np.prod(known)) if known and None not in known else None
    if classes is not None and classes < k:
        raise LrpcError(f"{k} targets per sample, but the output has only {classes} classes")
    scores = _class_scores(em, logits, program, region)
    given = _per_sample(em, target, logits, k)
    top = em.op("TopK", [scores, em.ints([k])], {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2,
                dtype=em.dtype)[1]
    top.dtype = np.int64  # the indices
    resolved = em.op("Where", [em.op("Less", [given, em.const(0, np.int64)], dtype=np.bool_), top, given],
                     dtype=np.int64)
    return [em.op("Gather", [resolved, em.const(j, np.int64)], {"axis": 1}, dtype=np.int64) for j in range(k)]


def emit_attribution(program: Program, table: LayerTable, method, rule: Rule, at: gs.Tensor | None = None,
                     labels: bool = False, targets: int = 1) -> Emitted:
    """A gradient method's backward pass (:mod:`lrpc.methods`): the exact gradient of the
    explained logit (``rule``, a :class:`~lrpc.rules.GradientRule`, on every layer and
    activation), at the explained input or at ``at`` (GradCAM), combined by the method
    into ``attribution``. Batched methods (SmoothGrad, IntegratedGradients) take it on a
    second forward pass over ``copies × N`` rows (:class:`_BatchedForward`)."""
    from .methods import ATTRIBUTION_NAME

    graph, tensors, x, logits, dtype, em = _ends(program)
    region = None
    if program.layout == "dense":
        rank = len(static_shape(logits))
        region = gs.Variable(REGION_NAME, dtype=dtype, shape=["lrp_region_batch", 1, *[f"r{i}" for i in range(rank - 2)]])
    if targets > 1:
        target = gs.Variable(TARGET_NAME, dtype=np.int64, shape=["lrp_batch", targets])
        columns = _target_columns(em, program, logits, target, targets, region)
    else:
        target = gs.Variable(TARGET_NAME, dtype=np.int64, shape=["lrp_targets"])
        columns = [_per_sample(em, target, logits)]
    backward = _Backward(em, [rule] * len(table.layers), set(), through=rule)
    batched = _BatchedForward(em, program, table, x, method) if method.copies > 1 else None
    stop = at.inputs[0] if at is not None and at.inputs else None
    parts, chosen_all, logit_all = [], [], []
    for column in columns:
        start = _output_relevance(em, logits, column, True, program, region)
        chosen_all.append(start.chosen)
        logit_all.append(start.logit.value)
        if batched is not None:
            def tile(r, rank):
                return None if r is None else em.sym(_tiled(em, r.value, method.copies, rank, dtype))

            tiled = start._replace(relevance=tile(start.relevance, len(logits.shape)),
                                   at_position=tile(start.at_position, 2))
            pending = backward.run(batched.nodes, batched.table,
                                   _seed(em, program, batched.table, backward, batched.logits, tiled))
            found = pending.get(batched.rows.value.name)
        else:
            pending = backward.run(table.nodes, table, _seed(em, program, table, backward, logits, start, stop),
                                   stop_after=stop)
            found = pending.get((at or x).name)
        if not found:
            where = f"layer output {at.name!r}" if at is not None else f"input {x.name!r}"
            raise LrpcError(f"no gradient reaches {where}")
        parts.append(method.combine(em, at if at is not None else x, add_all(found)).value)
    like = at if at is not None else x
    rest = ([1, *like.shape[2:]] if at is not None else list(like.shape[1:])) if like.shape else []
    rows = "batch" if targets == 1 else "lrp_rows"
    joined = parts[0] if len(parts) == 1 else em.op("Concat", parts, {"axis": 0}, dtype=dtype)
    name = ATTRIBUTION_NAME if ATTRIBUTION_NAME not in tensors else f"lrp_{ATTRIBUTION_NAME}"
    attribution = _named_output(graph, joined, name, dtype, [rows, *rest] if like.shape else None)
    return Emitted(target, attribution, _row_labels(em, chosen_all, logit_all) if labels else [], region)


def _ends(program: Program):
    """The graph, its tensors, the explained tensor and the output the backward starts at,
    the explained dtype (floating point, else an error) and an emitter of it."""
    graph = program.graph
    tensors = graph.tensors()
    x = tensors[program.explained_name]
    dtype = np.dtype(x.dtype or np.float32)
    if dtype.kind != "f":
        raise LrpcError(f"input {x.name!r} has dtype {dtype}; lrpc explains floating-point inputs")
    return graph, tensors, x, tensors[program.start_name], dtype, Emitter(graph, dtype)


def _tiled(em: Emitter, tensor, times: int, rank: int, dtype):
    """``tensor`` repeated ``times`` along the batch axis, copy-major."""
    return em.op("Tile", [tensor, em.ints([times] + [1] * (rank - 1))], dtype=dtype, hint="lrp_tiled")


class _BatchedForward:
    """The forward pass written once more over ``copies × N`` rows: the method's rows
    (noisy copies, interpolations) stand where the explained tensor was, and every other
    model input with the same batch axis (an attention mask, token types) is tiled to
    match, so each row sees its own sample's context. The explained tensor's producer (a token
    model's embedding lookup) is not copied."""

    def __init__(self, em: Emitter, program: Program, table: LayerTable, x, method):
        graph = program.graph
        batch = x.shape[0] if x.shape else None
        if not isinstance(batch, str):
            has = f"a fixed batch ({batch})" if isinstance(batch, int) else "no known batch axis"
            raise LrpcError(f"{method.name} batches its {method.copies} copies along the batch axis, and "
                            f"{x.name!r} has {has}: export the model with a dynamic batch axis")
        self.rows = method.rows(em, x)
        self.rows.value.shape = _batched_shape(x.shape, batch)
        self.rows.value.dtype = x.dtype
        renamed = {x.name: self.rows.value}
        g = node_graph(graph)
        # the explained tensor may have lost the inputs' batch symbol on its way (a token
        # model's Reshape before the embedding: unk__0); the inputs it comes from still say it
        upstream = nx.ancestors(g, ("tensor", x.name))
        symbols = {batch} | {t.shape[0] for t in graph.inputs
                             if ("tensor", t.name) in upstream and t.shape and isinstance(t.shape[0], str)}
        for t in graph.inputs:
            if t.name != x.name and t.shape and t.shape[0] in symbols:
                renamed[t.name] = _tiled(em, t, method.copies, len(t.shape), t.dtype)
        reach = set()
        for name in renamed:
            reach |= nx.descendants(g, ("tensor", name))
        # what lies upstream of the explained tensor is copied too where the rest reads it (a
        # causal mask sized from the token ids' shape); only the explained tensor's producer is
        # not: the method's rows stand for its output (copies nothing reads are cleaned up)
        below = nx.ancestors(g, ("tensor", program.start_name)) & reach
        originals = [n for n in graph.nodes if ("node", id(n)) in below and all(t.name != x.name for t in n.outputs)]
        self.nodes, self.table = _clone_nodes(program, table, originals, renamed, "lrp_rows", batch=batch)
        start_name = self.table.renamed[program.start_name]
        self.logits = next(t for n in self.nodes for t in n.outputs if t.name == start_name)


def _relevance_name(tensors) -> str:
    """``relevance``, or ``lrp_relevance`` when the model already has a tensor of that name
    (the file records the name used in ``lrpc.relevance``)."""
    return RELEVANCE_NAME if RELEVANCE_NAME not in tensors else f"lrp_{RELEVANCE_NAME}"


def _named_output(graph: gs.Graph, value, name: str, dtype, shape) -> gs.Variable:
    """``value`` under an output's name: the backward graph's own tensor is renamed (an
    Identity would be folded away by runtimes such as OpenVINO, which then report the
    output under either name); anything else (a model tensor, an already named output)
    is copied by an Identity."""
    if isinstance(value, gs.Variable) and value.name.startswith("lrp/") and value.inputs:
        value.name, value.dtype, value.shape = name, dtype, shape
        return value
    out = gs.Variable(name, dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[value], outputs=[out]))
    return out


class _Backward:
    """Walks nodes in reverse topological order, summing and propagating relevance."""

    def __init__(self, em: Emitter, rules: list[Rule], watch: set[str], report: bool = False,
                 through: Rule | None = None):
        """``through``: the rule of activations and routing ops (default: their route,
        LRP's pass-through; a gradient method's rule differentiates them)."""
        self.em, self.rules, self.watch, self.through = em, rules, watch, through
        self.captured: dict[str, Sym] = {}
        # layer index -> (relevance arriving at its output, relevance it passes on)
        self.report: dict[int, tuple[Sym, list[Sym]]] | None = {} if report else None

    def run(self, nodes, table, pending: dict, stop_after: gs.Node | None = None,
            original_names: dict | None = None) -> dict:
        """``original_names``: clone tensor name -> the name ``--relevance-at`` knows (CRP)."""
        em = self.em
        original_names = original_names or {}
        for node in reversed(nodes):
            if node is stop_after:
                break
            arrived = [pending.pop(t.name, None) for t in node.outputs]
            if not any(arrived):
                continue  # nothing reached this node (CP-LRP's attention branch)
            relevances = [add_all(parts) if parts else None for parts in arrived]
            for t, r in zip(node.outputs, relevances):
                original = original_names.get(t.name, t.name)
                if r is not None and original in self.watch:
                    self.captured[original] = r
            layer = table.by_node.get(id(node))
            if layer is None:
                slots, incoming = _pass_unknown(em, node, table, relevances)
            elif layer.spec.route_outputs is not None:
                slots, incoming = layer.acts, layer.spec.route_outputs(em, layer, relevances)
            else:
                slots, incoming = layer.acts, _propagate(em, layer, self.rules, relevances[0], self.through)
            for slot, r in zip(slots, incoming):
                if r is not None and not r.is_zero:  # a factor held constant gets none
                    pending.setdefault(node.inputs[slot].name, []).append(r)
            if self.report is not None and layer is not None and layer.index >= 0:
                self.report[layer.index] = (relevances[0], [r for r in incoming if r is not None and not r.is_zero])
        return pending

    def report_tensor(self, count: int, x) -> gs.Variable:
        """``[N, layers, 2]``: per sample and layer, the relevance summed at the layer's
        output and at its inputs (zeros for a layer nothing reached)."""
        em = self.em
        batch = em.op("Shape", [x], {"start": 0, "end": 1}, dtype=np.int64)
        nothing = em.filled(batch, 0.0)
        per_sample = em.op("Concat", [batch, em.ints([-1])], {"axis": 0}, dtype=np.int64)

        def total(r: Sym):
            # [N, -1], not Flatten: a layer may see the batch merged with another axis
            # ([N·T, H] around a Gemm, as GPT-2's legacy export writes its Conv1D)
            flat = em.op("Reshape", [r, per_sample], dtype=em.dtype)
            return em.op("ReduceSum", [flat, em.ints([1])], {"keepdims": 0}, dtype=em.dtype)

        columns = []
        for index in range(count):
            out, given = self.report.get(index, (None, []))
            out_sum = total(out) if out is not None else nothing
            in_sum = add_all([em.sym(total(r)) for r in given]).value if given else nothing
            pair = em.op("Concat", [em.op("Unsqueeze", [t, em.ints([1, 2])], dtype=em.dtype) for t in (in_sum, out_sum)],
                         {"axis": 2}, dtype=em.dtype)
            columns.append(pair)
        return em.op("Concat", columns, {"axis": 1}, dtype=em.dtype) if len(columns) > 1 else columns[0]


@dataclass
class _ClonedTable:
    """The layers below a CRP concept, copied to run on the tiled input."""

    by_node: dict
    carriers: set
    renamed: dict  # original tensor name -> clone's
    original_names: dict  # clone's tensor name -> original


def _clone_below(program: Program, table: LayerTable, x, x_tiled, at: gs.Tensor) -> tuple[list, _ClonedTable]:
    """Copy every node that depends on ``x`` and leads to ``at``, reading ``x_tiled``."""
    graph = program.graph
    g = node_graph(graph)
    below = nx.ancestors(g, ("tensor", at.name)) & nx.descendants(g, ("tensor", x.name))
    originals = [n for n in graph.nodes if ("node", id(n)) in below]
    return _clone_nodes(program, table, originals, {x.name: x_tiled}, "crp_batch")


def _clone_nodes(program: Program, table: LayerTable, originals: list, renamed: dict, rows: str,
                 batch=None) -> tuple[list, _ClonedTable]:
    """Copies of ``originals`` (topological order) reading ``renamed`` (tensor name -> the
    tensor standing in for it) and each other's outputs; their outputs' batch axis becomes
    ``rows`` (every output's first, or with ``batch`` given every axis of that symbol).
    A fused pattern's copy gets copies of its original nodes, which unfusing restores."""
    graph = program.graph
    renamed = dict(renamed)
    clones, by_node = [], {}
    for node in originals:
        inputs = [renamed.get(t.name, t) for t in node.inputs]
        outputs = []
        for t in node.outputs:
            copy = gs.Variable(f"{t.name}/{rows}", dtype=t.dtype, shape=_batched_shape(t.shape, batch, rows))
            renamed[t.name] = copy
            outputs.append(copy)
        clone = gs.Node(node.op, name=f"{node.name}/{rows}" if node.name else "", attrs=dict(node.attrs),
                        inputs=inputs, outputs=outputs, domain=node.domain)
        graph.nodes.append(clone)
        clones.append(clone)
        if id(node) in program.fused:
            program.fused[id(clone)] = _cloned_pattern(program.fused[id(node)], renamed, rows)
        layer = table.by_node.get(id(node))
        if layer is not None:
            by_node[id(clone)] = replace(layer, node=clone)
    names = {name: t.name for name, t in renamed.items()}
    carriers = {names[c] for c in table.carriers if c in names}
    return clones, _ClonedTable(by_node, carriers, names, {v: k for k, v in names.items()})


def _batched_shape(shape, batch, rows: str = "lrp_rows"):
    """A tensor's declared shape in a copy of the forward with more rows: the batch symbol
    becomes ``rows`` (``batch`` None: the first axis does) and every other symbol unknown
    (``5*batch``, an exporter's ``unk__37``: they may stand for the batch too); static
    dims stay, so ranks and broadcast axes are still known."""
    if shape is None:
        return None
    if batch is None:
        return [rows, *shape[1:]] if len(shape) else list(shape)
    return [rows if d == batch else d if isinstance(d, (int, np.integer)) else None for d in shape]


def _cloned_pattern(saved: list, renamed: dict, rows: str) -> list:
    """A fused pattern's original nodes (``(node, inputs, outputs)`` as :meth:`Program.fuse`
    keeps them), copied to read ``renamed`` and to write the fused copy's outputs."""
    inner = {}
    for _, _, outputs in saved:
        for t in outputs:
            if t.name not in renamed:
                inner[t.name] = gs.Variable(f"{t.name}/{rows}", dtype=t.dtype)
    entries = []
    for original, inputs, outputs in saved:
        copy = gs.Node(original.op, name=f"{original.name}/{rows}" if original.name else "",
                       attrs=dict(original.attrs), domain=original.domain)
        entries.append((copy, [renamed.get(t.name) or inner.get(t.name) or t for t in inputs],
                        [renamed.get(t.name) or inner[t.name] for t in outputs]))
    return entries


class _Start(NamedTuple):
    """Where the relevance starts: ``relevance`` at the output (its shape), the explained
    ``logit`` and ``chosen`` class per sample, and for a ``sequence`` output the relevance
    at the explained position alone (``[N, V]``; zero at every other position)."""

    relevance: Sym
    logit: Sym
    chosen: object
    at_position: Sym | None = None


def _output_relevance(em: Emitter, logits, target, normalize: bool, program: Program, region=None) -> _Start:
    """One-hot of the explained class per sample; a negative target means the arg-max.

    ``flat`` outputs (``[N, K]``, ``[N, K, 1, 1]``) are explained over their flattened
    classes; ``sequence`` outputs ``[N, T, V]`` at one position, over ``V``; ``dense``
    outputs ``[N, K, H, W]`` as channel K summed over the region (``lrp_region``, all
    positions by default): every position of the channel inside it starts with relevance.
    """
    position = program.position
    if program.layout == "dense":
        rank = len(static_shape(logits))
        scores = _class_scores(em, logits, program, region)
        classes = _dim(em, scores, 1)
        chosen = _chosen(em, scores, target)
        onehot = em.sym(_one_hot(em, chosen, classes)) + _nan_if_out_of_range(em, chosen, classes)
        mask = em.sym(em.op("Reshape", [onehot, em.ints([0, -1] + [1] * (rank - 2))], dtype=em.dtype)) * em.sym(region)
        logit = _picked(em, onehot, scores)
        if not normalize:
            return _Start(mask * em.sym(logits), logit, chosen)
        return _Start(em.sym(em.op("Expand", [mask, em.shape_of(logits)], dtype=em.dtype)), logit, chosen)  # its shape
    scores = _class_scores(em, logits, program, region)
    classes = _dim(em, scores, 1)
    chosen = _chosen(em, scores, target)
    onehot = em.sym(_one_hot(em, chosen, classes)) + _nan_if_out_of_range(em, chosen, classes)
    logit = _picked(em, onehot, scores)
    if position is not None:
        at_position = onehot if normalize else onehot * em.sym(scores)
        spread = em.sym(em.op("Unsqueeze", [at_position.value, em.ints([1])], dtype=em.dtype)) * em.sym(
            _position_mask(em, logits, position))
        return _Start(spread, logit, chosen, at_position)
    if static_shape(logits) is None or len(static_shape(logits)) != 2:
        onehot = em.sym(em.op("Reshape", [onehot, em.shape_of(logits)], dtype=em.dtype))
    return _Start(onehot if normalize else onehot * em.sym(logits), logit, chosen)


def _position_mask(em: Emitter, like, position: int):
    """``[1, T, 1]``: 1 at the explained position of ``like``'s axis 1, 0 elsewhere."""
    at = _one_hot(em, em.ints([position]), _dim(em, like, 1))  # [1, T]
    return em.op("Reshape", [at, em.ints([1, -1, 1])], dtype=em.dtype)


@dataclass
class _NodeAt:
    """A node seen at one position of its sequence axis: the same op, attributes and weight,
    its activation and output gathered there. Rules and VJPs read it as they read the node;
    it is never added to the graph."""

    op: str
    name: str
    attrs: dict
    domain: str
    inputs: list
    outputs: list


def _seed(em: Emitter, program: Program, table, backward: "_Backward", logits, start: _Start,
          stop_after=None) -> dict:
    """The relevance the backward pass starts from, by tensor name.

    A sequence output is explained at one position, so its relevance is zero at every other.
    When the output is a MatMul of an activation ``[N, T, H]`` by a weight ``[H, V]`` (a
    language model's head), the head's rule runs at that position alone (``[N, H]`` by
    ``[H, V]``; a MatMul's rows are independent, so the numbers are the same) and its
    input's relevance is that row, zero elsewhere: no ``[N, T, V]`` relevance tensors (four
    of 49 MiB for GPT-2 at T = 256) and 1/T of the head's backward product."""
    full = {logits.name: [start.relevance]}
    if start.at_position is None or logits.name in backward.watch:
        return full
    head = next((layer for layer in table.by_node.values() if layer.node.outputs and layer.node.outputs[0] is logits),
                None)
    if (head is None or head.node is stop_after or head.op_type != "MatMul" or head.kind in TRANSPARENT
            or head.acts != [0] or head.param_slots.get("weight") != 1):
        return full
    x, weight = head.node.inputs
    shapes = static_shape(x), static_shape(weight), static_shape(logits)
    if None in shapes or [len(shape) for shape in shapes] != [3, 2, 3]:
        return full
    index = em.const(program.position, np.int64)
    x_at = em.op("Gather", [x, index], {"axis": 1}, dtype=em.dtype)
    z_at = em.op("Gather", [logits, index], {"axis": 1}, dtype=em.dtype)
    x_at.shape, z_at.shape = [x.shape[0], x.shape[2]], [logits.shape[0], logits.shape[2]]
    node = _NodeAt(head.node.op, head.node.name, dict(head.node.attrs), head.node.domain, [x_at, weight], [z_at])
    incoming = _propagate(em, replace(head, node=node), backward.rules, start.at_position, backward.through)
    if not incoming or incoming[0] is None or incoming[0].is_zero:
        return full
    spread = em.sym(em.op("Unsqueeze", [incoming[0].value, em.ints([1])], dtype=em.dtype)) * em.sym(
        _position_mask(em, x, program.position))
    if backward.report is not None and head.index >= 0:
        backward.report[head.index] = (start.at_position, [spread])
    return {x.name: [spread]}


def _class_scores(em: Emitter, logits, program: Program, region=None):
    """``[N, classes]``: what a target indexes (flattened classes; the vocabulary at the
    explained position; a dense output's channels summed over the region)."""
    if program.layout == "dense":
        rank = len(static_shape(logits))
        weighted = em.sym(logits) * em.sym(region)
        return em.op("ReduceSum", [weighted, em.ints(range(2, rank))], {"keepdims": 0}, dtype=em.dtype)
    if program.position is None:
        return em.op("Flatten", [logits], {"axis": 1}, dtype=em.dtype)
    return em.op("Gather", [logits, em.const(program.position, np.int64)], {"axis": 1}, dtype=em.dtype)


def _picked(em: Emitter, onehot: Sym, scores) -> Sym:
    """``[N]``: the explained logit of each sample (its one-hot row times its scores)."""
    return em.sym(em.op("ReduceSum", [onehot * em.sym(scores), em.ints([1])], {"keepdims": 0}, dtype=em.dtype))


def _nan_if_out_of_range(em: Emitter, chosen, classes) -> Sym:
    """``[N, 1]``: 0 for a valid class, NaN beyond the last one. A graph cannot raise, so a
    target out of range gives a row of NaN relevance, never a plausible-looking zero."""
    valid = em.op("Less", [chosen, classes], dtype=np.bool_)
    flag = em.op("Where", [valid, em.const(0.0), em.const(np.nan)], dtype=em.dtype)
    return em.sym(em.op("Unsqueeze", [flag, em.ints([1])], dtype=em.dtype))


def _per_sample(em: Emitter, target, logits, width: int = 1):
    """``lrp_target`` as one class per sample, ``[N]`` (``width`` > 1: ``[N, width]``, one
    row of classes per sample): empty, or a single row of negatives (the default ``[-1]``),
    means -1 everywhere (the arg-max; for several targets the j-th highest class); any other
    size must be N·width. A single row of classes for a batch of N > 1 is an error from the
    runtime (a Reshape that cannot fit), never silently broadcast: a batching server that
    merges requests with and without targets must not mix them up.

    The default is one -1, not an empty tensor: OpenVINO folds a defaulted input into a
    constant, and takes an empty one for a single element (its arg-max file then explained
    a relevance of shape ``(0, ...)``, or failed for N > 1)."""
    n = em.op("Shape", [logits], {"start": 0, "end": 1}, dtype=np.int64)
    rows = n if width == 1 else em.op("Concat", [n, em.ints([width])], {"axis": 0}, dtype=np.int64)
    flat = target if width == 1 else em.op("Reshape", [target, em.ints([-1])], dtype=np.int64)
    size = em.op("Size", [flat], dtype=np.int64)
    zero = em.const(0, np.int64)
    padded = em.op("Concat", [flat, em.ints([-1])], {"axis": 0}, dtype=np.int64)  # never empty
    all_negative = em.op("Less", [em.op("ReduceMax", [padded], {"keepdims": 0}, dtype=np.int64), zero],
                         dtype=np.bool_)
    one_row = em.op("Equal", [size, em.const(width, np.int64)], dtype=np.bool_)
    default = em.op("Or", [em.op("Equal", [size, zero], dtype=np.bool_),
                           em.op("And", [all_negative, one_row], dtype=np.bool_)], dtype=np.bool_)
    chosen = em.cast(default, np.int64)
    count = em.op("Mul", [n, chosen], dtype=np.int64)
    if width > 1:
        count = em.op("Mul", [count, em.ints([width])], dtype=np.int64)
    keep = em.op("Mul", [size, em.op("Sub", [em.const(1, np.int64), chosen], dtype=np.int64)], dtype=np.int64)
    kept = em.op("Slice", [flat, em.ints([0]), em.op("Unsqueeze", [keep, em.ints([0])], dtype=np.int64)],
                 dtype=np.int64)
    filler = em.op("Expand", [em.ints([-1]), count], dtype=np.int64)
    joined = em.op("Concat", [kept, filler], {"axis": 0}, dtype=np.int64)
    return em.op("Reshape", [joined, rows], dtype=np.int64, hint="lrp_targets")


def _chosen(em: Emitter, scores, target):
    """The target per sample, its arg-max where negative."""
    best = em.op("ArgMax", [scores], {"axis": 1, "keepdims": 0}, dtype=np.int64)
    negative = em.op("Less", [target, em.const(0, np.int64)], dtype=np.bool_)
    return em.op("Where", [negative, best, target], dtype=np.int64, hint="lrp_chosen_target")


def _dim(em: Emitter, x, axis: int):
    """One dimension of ``x`` as a scalar: ``OneHot``'s depth must be one for every runtime
    (onnx's reference evaluator refuses a one-element 1-D tensor)."""
    return em.op("Gather", [em.shape_of(x), em.const(axis, np.int64)], {"axis": 0}, dtype=np.int64)


def _one_hot(em: Emitter, indices, depth):
    return em.op("OneHot", [indices, depth, em.const([0.0, 1.0])], {"axis": -1}, dtype=em.dtype)


def _propagate(em: Emitter, layer: Layer, rules: list[Rule], relevance: Sym, through: Rule | None = None) -> list[Sym]:
    if layer.kind in TRANSPARENT:
        if through is not None:
            return through.propagate(em, layer, relevance)
        return layer.spec.route(em, layer, relevance)
    return rules[layer.index].propagate(em, layer, relevance)


def _pass_unknown(em: Emitter, node: gs.Node, table: LayerTable, relevances: list):
    """skip_checks: an unknown op with one relevance input of the output's shape passes
    relevance through unchanged; anything else cannot be explained."""
    slots = [i for i, t in enumerate(node.inputs) if t.name in table.carriers]
    relevance = relevances[0]
    if len(slots) == 1 and len(relevances) == 1:
        in_shape = static_shape(node.inputs[slots[0]])
        out_shape = static_shape(node.outputs[0])
        if in_shape is not None and in_shape == out_shape:
            return slots, [relevance]
    raise UnsupportedModelError(
        f"{node.name or node.op} ({node.op}) is not supported and cannot be passed through "
        "(it changes shape or merges inputs); register it with lrpc.register_layer"
    )
