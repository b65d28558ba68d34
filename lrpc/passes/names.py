"""Module paths for node names written by torch's dynamo exporter.

The TorchScript exporter names nodes after their module path (``/features/features.0/Conv``)
and ``LayerMap`` globs, hierarchical indices and ``inspect`` read those paths. The dynamo
exporter names nodes ``node_Conv_811`` and keeps the path in each node's metadata
(``pkg.torch.onnx.name_scopes``: ``['', 'features', 'features.0', 'conv2d']``). This pass
names such nodes the TorchScript way, ``/features/features.0/Conv`` (``_1``, ``_2`` for
more of one op in a module), so the two exports read alike.
"""

from __future__ import annotations

import ast

import onnx

from ..graph import Program

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def name_from_scopes(program: Program, model: onnx.ModelProto) -> Program:
    """``model`` is the file ``program`` was read from (onnx-graphsurgeon does not keep node
    metadata); its nodes are in the same order as ``program``'s."""
    nodes = program.graph.nodes
    if len(nodes) != len(model.graph.node):
        return program
    taken = {n.name for n in nodes}
    used: dict[str, int] = {}
    renamed = 0
    for node, proto in zip(nodes, model.graph.node):
        scopes = _scopes(proto)
        if scopes is None or node.name != proto.name:
            continue
        modules = _levels([s for s in scopes[1:-1] if s])  # the first is the root, the last the op itself
        base = "/" + "/".join([*modules, node.op])
        k = used.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        used[base] = k + 1
        taken.add(name)
        program.aliases[node.name] = name
        node.name = name
        renamed += 1
    if renamed:
        program.notes.append(f"{renamed} node(s) named after their module path (dynamo export)")
    return program


def _levels(qualified: list[str]) -> list[str]:
    """Qualified module names (``features``, ``features.0``, ``features.0.conv``) as the
    TorchScript exporter writes each level: the attribute name, ``parent.index`` for a
    container's child (``features``, ``features.0``, ``conv``)."""
    parts, parent = [], ""
    for name in qualified:
        rest = name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name
        if rest.isdigit():
            rest = f"{parent.rsplit('.', 1)[-1]}.{rest}"
        parts.append(rest)
        parent = name
    return parts


def _scopes(node: onnx.NodeProto) -> list[str] | None:
    for entry in node.metadata_props:
        if entry.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return None
            return [str(v) for v in value] if isinstance(value, list) else None
    return None
