"""Constant folding: Constant, ConstantOfShape and shape subgraphs become initializers.

onnx-graphsurgeon's folder does the work (it evaluates foldable subgraphs with
onnxruntime); afterwards a weight is always a ``gs.Constant``, whatever the exporter
wrote (``Constant`` nodes, ``Transpose`` of an initializer, shape arithmetic).

What folding may materialize is bounded (``max_bytes``, the command line's
``--max-constant-bytes``): by default the larger of 256 MiB and the model's largest
weight, so a 160-byte file cannot make lrpc allocate gigabytes. A constant beyond the
bound is refused in one line before it is computed.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpcError
from ..graph import Program, static_shape

DEFAULT_MAX_CONSTANT_BYTES = 256 * 2**20


def constant_limit(program: Program, requested: int | None = None) -> int:
    if requested is not None:
        return int(requested)
    largest = max((t.values.nbytes for t in program.graph.tensors().values() if isinstance(t, gs.Constant)),
                  default=0)
    return max(DEFAULT_MAX_CONSTANT_BYTES, largest)


def fold_constants(program: Program, max_bytes: int | None = None) -> Program:
    # (onnx-graphsurgeon folds with onnxruntime sessions, whose optimizer warnings go to
    # the process's stderr: lrpc keeps onnxruntime's default logger at errors, see lrpc.graph)
    limit = constant_limit(program, max_bytes)
    graph = program.graph
    _refuse_oversized(graph, limit)
    gs_logger = logging.getLogger("onnx_graphsurgeon")
    previous = gs_logger.level
    gs_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=limit)
    finally:
        gs_logger.setLevel(previous)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _refuse_oversized(graph, limit)
    return program


def _refuse_oversized(graph: gs.Graph, limit: int) -> None:
    """A node computed from constants alone whose (statically known) output exceeds the limit."""
    for node in graph.nodes:
        inputs = [t for t in node.inputs if t.name]
        if not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
            continue
        for out in node.outputs:
            shape = static_shape(out)
            if shape is None or None in shape or out.dtype is None:
                continue
            size = int(np.prod(shape, dtype=np.float64) * np.dtype(out.dtype).itemsize)
            if size > limit:
                raise LrpcError(f"{node.name or node.op} ({node.op}) makes a constant of {size:,} bytes from "
                                f"constants alone, over the limit of {limit:,} (--max-constant-bytes)")
