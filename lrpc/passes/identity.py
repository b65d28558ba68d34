"""Remove Identity and (inference-mode) Dropout nodes by rewiring their consumers.

A node whose output is a graph output stays: the compiled file keeps output names.
"""

from __future__ import annotations

from ..graph import Program

PASSTHROUGH = {"Identity", "Dropout"}


def remove_identity(program: Program) -> Program:
    graph = program.graph
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op not in PASSTHROUGH or not node.inputs:
            continue
        out = node.outputs[0]
        if out.name in outputs:
            continue
        src = node.inputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return program
