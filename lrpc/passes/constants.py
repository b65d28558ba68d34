"""Constant folding: Constant, ConstantOfShape and shape subgraphs become initializers.

onnx-graphsurgeon's folder does the work (it evaluates foldable subgraphs with
onnxruntime); afterwards a weight is always a ``gs.Constant``, whatever the exporter
wrote (``Constant`` nodes, ``Transpose`` of an initializer, shape arithmetic).
"""

from __future__ import annotations

import contextlib
import io
import logging

from ..graph import Program


def fold_constants(program: Program) -> Program:
    # onnx-graphsurgeon folds with onnxruntime sessions whose optimizer warnings
    # ("UnsqueezeElimination cannot remove node ...") go straight to the process's stderr
    # and mean nothing to a user: keep onnxruntime's default logger at errors
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    graph = program.graph
    gs_logger = logging.getLogger("onnx_graphsurgeon")
    previous = gs_logger.level
    gs_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            graph.fold_constants(fold_shapes=True, error_ok=True)
    finally:
        gs_logger.setLevel(previous)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return program
