"""Which nodes carry relevance, and the flat layer list composites index into.

A node carries relevance when it lies on a path from the explained input to the
relevance start. Its relevance inputs are the inputs that depend on the explained input;
the others (weights, shape tensors, other model inputs) are constants for LRP.

Layers are the relevance-carrying nodes except activations, in topological order,
indexed from 0. As in RelevancePropagation.jl, an activation belongs to the layer before
it (``Conv → Relu`` is one layer), so layer indices count what a user would call layers.
The *first layer* and *last layer* are the first and last layers with parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .graph import Program, relevance_path
from .registry import lookup
from .spec import SHAPE_READERS, TRANSPARENT, Layer


@dataclass
class LayerTable:
    nodes: list[gs.Node]  # every relevance-carrying node, topological order
    carriers: set[str]  # tensor names that carry relevance
    layers: list[Layer]  # indexed layers (no activations)
    by_node: dict[int, Layer]  # id(node) -> Layer, activations included
    unknown: list[gs.Node]  # relevance-carrying nodes without a registry entry

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


def find_layers(program: Program) -> LayerTable:
    nodes, carriers = relevance_path(program.graph, program.input_name, program.start_name, blocked=_blocked)

    layers: list[Layer] = []
    by_node: dict[int, Layer] = {}
    unknown: list[gs.Node] = []
    for node in nodes:
        spec = lookup(node.op)
        acts = [i for i, t in enumerate(node.inputs) if t.name in carriers]
        if spec is None:
            unknown.append(node)
            continue
        layer = Layer(node=node, spec=spec, acts=acts)
        if spec.params is not None and not (spec.check and spec.check(node, acts)):
            for role, where in spec.params(node, acts).items():
                if isinstance(where, int):
                    layer.param_slots[role] = where
                    layer.param_values[role] = node.inputs[where]
                else:
                    layer.param_values[role] = where
        by_node[id(node)] = layer
        if spec.kind not in TRANSPARENT:
            layer.index = len(layers)
            layers.append(layer)
    with_params = [layer for layer in layers if layer.has_params]
    if with_params:
        with_params[0].is_first = True
        with_params[-1].is_last = True
    return LayerTable(nodes=nodes, carriers=carriers, layers=layers, by_node=by_node, unknown=unknown)


def _blocked(node: gs.Node, slot: int) -> bool:
    """Edges relevance never takes: into shape computations, and those the op's spec
    names (the gate of a gating product)."""
    if node.op in SHAPE_READERS:
        return True
    spec = lookup(node.op)
    return bool(spec and spec.blocks and spec.blocks(node, slot))


def hierarchy(name: str) -> tuple[str, ...]:
    """Module path encoded in an exporter's node name: ``/features/features.0/Conv`` ->
    ``("features", "features.0", "Conv")``; dynamo names use dots (``features.0``)."""
    parts = [p for p in name.replace("::", "/").split("/") if p]
    return tuple(parts) if parts else (name,)
