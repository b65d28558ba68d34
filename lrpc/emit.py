"""Emit the relevance backward pass as ONNX nodes appended to the forward graph.

Relevance starts as a one-hot of the target class at the logits (times the logit when
``normalize_output_relevance`` is off), then walks the relevance-carrying nodes in
reverse topological order. Each node's output relevance is the sum of what its
consumers sent back (fan-out sums); its rule turns that into relevance for each of its
relevance inputs. Activations pass relevance through unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import LrpcError, UnsupportedModelError
from .graph import Program, static_shape
from .layers import LayerTable
from .spec import TRANSPARENT, Layer
from .rules import Rule
from .symbolic import Emitter, Sym, add_all

TARGET_NAME = "lrp_target"
RELEVANCE_NAME = "relevance"


def emit_relevance(
    program: Program,
    table: LayerTable,
    rules: list[Rule],
    normalize_output_relevance: bool = True,
) -> tuple[gs.Variable, gs.Variable]:
    """Append the backward pass; returns the (target input, relevance output) variables."""
    graph = program.graph
    tensors = graph.tensors()
    x = tensors[program.input_name]
    logits = tensors[program.start_name]
    dtype = np.dtype(x.dtype or np.float32)
    if dtype.kind != "f":
        raise LrpcError(f"input {x.name!r} has dtype {dtype}; lrpc explains floating-point inputs")
    em = Emitter(graph, dtype)

    target = gs.Variable(TARGET_NAME, dtype=np.int64, shape=["lrp_batch"])
    start = _output_relevance(em, logits, target, normalize_output_relevance)

    pending: dict[str, list[Sym]] = {logits.name: [start]}
    for node in reversed(table.nodes):
        arrived = [pending.pop(t.name, None) for t in node.outputs]
        if not any(arrived):
            continue
        relevances = [add_all(parts) if parts else None for parts in arrived]
        layer = table.by_node.get(id(node))
        if layer is None:
            slots, incoming = _pass_unknown(em, node, table, relevances)
        elif layer.spec.route_outputs is not None:
            slots, incoming = layer.acts, layer.spec.route_outputs(em, layer, relevances)
        else:
            slots, incoming = layer.acts, _propagate(em, layer, rules, relevances[0])
        for slot, r in zip(slots, incoming):
            pending.setdefault(node.inputs[slot].name, []).append(r)

    parts = pending.get(x.name)
    if not parts:
        raise LrpcError(f"no relevance reaches input {x.name!r}")
    name = RELEVANCE_NAME if RELEVANCE_NAME not in tensors else f"lrp_{RELEVANCE_NAME}"
    final = add_all(parts)
    relevance = gs.Variable(name, dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[final.value], outputs=[relevance]))
    return target, relevance


def _output_relevance(em: Emitter, logits, target, normalize: bool) -> Sym:
    """One-hot of the explained class per sample; a negative target means the arg-max.

    Outputs shaped ``[N, K, 1, 1]`` (or any ``[N, ...]``) are explained over their
    flattened classes.
    """
    flat = em.op("Flatten", [logits], {"axis": 1}, dtype=em.dtype)
    best = em.op("ArgMax", [flat], {"axis": 1, "keepdims": 0}, dtype=np.int64)
    negative = em.op("Less", [target, em.const(0, np.int64)], dtype=np.bool_)
    chosen = em.op("Where", [negative, best, target], dtype=np.int64, hint="lrp_chosen_target")
    depth = em.op("Shape", [flat], {"start": 1, "end": 2}, dtype=np.int64)
    onehot = em.sym(em.op("OneHot", [chosen, depth, em.const([0.0, 1.0])], {"axis": -1}, dtype=em.dtype))
    if static_shape(logits) is None or len(static_shape(logits)) != 2:
        onehot = em.sym(em.op("Reshape", [onehot, em.shape_of(logits)], dtype=em.dtype))
    return onehot if normalize else onehot * em.sym(logits)


def _propagate(em: Emitter, layer: Layer, rules: list[Rule], relevance: Sym) -> list[Sym]:
    if layer.kind in TRANSPARENT:
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
