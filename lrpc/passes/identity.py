"""Remove Identity, (inference-mode) Dropout and casts to the dtype a tensor already has,
by rewiring their consumers.

A node whose output is a graph output stays: the compiled file keeps output names.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..graph import Program

PASSTHROUGH = {"Identity", "Dropout"}


def _no_op_cast(node) -> bool:
    """``Cast`` to the dtype its input already has (exporters write them around RMSNorm)."""
    if node.op != "Cast" or not node.inputs or node.inputs[0].dtype is None:
        return False
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))) == np.dtype(node.inputs[0].dtype)
    except (TypeError, KeyError, ValueError):
        return False


def remove_identity(program: Program) -> Program:
    graph = program.graph
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if not (node.op in PASSTHROUGH or _no_op_cast(node)) or not node.inputs:
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
