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

import onnx
import onnx_graphsurgeon as gs

from .graph import Program, is_float, relevance_path
from .contrib import is_fused_op
from .deployed import is_quantized_op
from .registry import lookup
from .spec import SHAPE_READERS, TRANSPARENT, Layer


@dataclass
class LayerTable:
    nodes: list[gs.Node]  # every relevance-carrying node, topological order
    carriers: set[str]  # tensor names that carry relevance
    layers: list[Layer]  # indexed layers (no activations)
    by_node: dict[int, Layer]  # id(node) -> Layer, activations included
    unknown: list[gs.Node]  # relevance-carrying nodes without a registry entry
    exact: bool = False  # a gradient method's table: nothing held constant

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


def _contrib_namesake(node: gs.Node) -> bool:
    """An onnxruntime contrib op named like a standard one (``com.microsoft.nchwc.Conv``, on
    blocked layouts): not the standard op, whatever its name (the quantizers' com.microsoft
    ``QuantizeLinear``/``DequantizeLinear`` are the standard ones)."""
    return is_fused_op(node.domain or "") and onnx.defs.has(node.op) and not is_quantized_op(node.op)


def find_layers(program: Program, exact: bool = False) -> LayerTable:
    """``exact``: the table of a gradient method, where no input is held constant (gates,
    statistics and divisors carry the gradient too)."""
    blocked = _blocked_exact if exact else _blocked
    nodes, carriers = relevance_path(program.graph, program.explained_name, program.start_name, blocked=blocked)

    layers: list[Layer] = []
    by_node: dict[int, Layer] = {}
    unknown: list[gs.Node] = []
    for node in nodes:
        spec = None if _contrib_namesake(node) else lookup(node.op)
        if spec is not None and spec.gradient_only and not exact:
            spec = None  # differentiable, but LRP has no rule for it
        acts = [i for i, t in enumerate(node.inputs) if t.name in carriers]
        if spec is None:
            unknown.append(node)
            continue
        layer = Layer(node=node, spec=spec, acts=acts)
        if spec.params is not None and not spec.problem(node, acts, exact):
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
    for layer, path in zip(layers, hierarchical_indices([layer.name for layer in layers])):
        layer.path_index = path
    with_params = [layer for layer in layers if layer.has_params]
    if with_params:
        with_params[0].is_first = True
        with_params[-1].is_last = True
    return LayerTable(nodes=nodes, carriers=carriers, layers=layers, by_node=by_node, unknown=unknown, exact=exact)


def _blocked_exact(node: gs.Node, slot: int) -> bool:
    """Edges no gradient takes: into shape readers, integer outputs, quantization parameters."""
    return _blocked(node, slot, exact=True)


def _blocked(node: gs.Node, slot: int, exact: bool = False) -> bool:
    """Edges relevance never takes: into shape computations, into ops whose outputs are
    all integers or booleans (comparisons, ``IsNaN``, casts to int: relevance cannot live
    there, except the integers of a quantized graph, which stand for float values), and
    those the op's spec names (the gate of a gating product)."""
    if node.op in SHAPE_READERS:
        return True
    if _quantization_parameter(node.inputs[slot]):
        return True
    if node.outputs and not any(is_float(t) for t in node.outputs) and not is_quantized_op(node.op):
        return True
    if exact:
        return False
    spec = lookup(node.op)
    return bool(spec and spec.blocks and spec.blocks(node, slot))


def _quantization_parameter(tensor) -> bool:
    """The scale or zero point that ``DynamicQuantizeLinear`` computes from its input: a
    constant for relevance, like a weight (the quantized values carry the relevance)."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return producer is not None and producer.op == "DynamicQuantizeLinear" and tensor is not producer.outputs[0]


def hierarchical_indices(names: list[str]) -> list[tuple[int, ...]]:
    """Nested indices from module paths, like RelevancePropagation.jl's ``(1, 2)`` for the
    second layer of the first chain (but from 0): ``/features/features.3/Conv`` is
    ``(0, k)`` when ``features`` is the first top-level module and ``features.3`` its k-th
    child seen. Layers that share one module path get one more index, their order in it."""
    paths = [module_path(name) for name in names]
    children: dict[tuple, dict[str, int]] = {}
    prefixes = []
    for path in paths:
        index = []
        for depth, part in enumerate(path):
            seen = children.setdefault(path[:depth], {})
            index.append(seen.setdefault(part, len(seen)))
        prefixes.append(tuple(index))
    shared = {path: paths.count(path) for path in set(paths)}
    position: dict[tuple, int] = {}
    result = []
    for path, prefix in zip(paths, prefixes):
        if shared[path] == 1 and prefix:
            result.append(prefix)
        else:
            k = position.get(path, 0)
            position[path] = k + 1
            result.append(prefix + (k,))
    return result


def module_path(name: str) -> tuple[str, ...]:
    """The module path in an exporter's node name, without the op: ``/a/a.0/Conv`` ->
    ``(a, a.0)``; a top-level op (``/Flatten``, a functional call) is its own module."""
    parts = hierarchy(name)
    return parts[:-1] if len(parts) > 1 else parts


def module_name(name: str) -> str:
    """The torch-style qualified module name: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``
    (exporters repeat the parent's name in each level)."""
    qualified = ""
    for part in module_path(name):
        qualified = part if not qualified or part.startswith(qualified + ".") else f"{qualified}.{part}"
    return qualified


def hierarchy(name: str) -> tuple[str, ...]:
    """Module path encoded in an exporter's node name: ``/features/features.0/Conv`` ->
    ``("features", "features.0", "Conv")``; dynamo names use dots (``features.0``)."""
    parts = [p for p in name.replace("::", "/").split("/") if p]
    return tuple(parts) if parts else (name,)
