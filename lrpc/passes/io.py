"""Choose the explained input and where relevance starts.

``strip_softmax`` is the ONNX form of RelevancePropagation.jl's ``strip_softmax``: the
relevance starts at the logits feeding a final Softmax/LogSoftmax, while the compiled
file still returns the model's own outputs, softmax and all.
"""

from __future__ import annotations

import numpy as np

from ..errors import LrpcError
from ..graph import Program

SOFTMAX = {"Softmax", "LogSoftmax"}


def select_input(program: Program, name: str | None = None) -> Program:
    inputs = program.runtime_inputs()
    names = [t.name for t in inputs]
    if name is not None:
        if name not in names:
            raise LrpcError(f"input {name!r} not found; the model's inputs are {names}")
        program.input_name = name
    elif not inputs:
        raise LrpcError("the model has no inputs to explain")
    else:
        program.input_name = names[0]
    return program


def _default_output(outputs):
    """The first floating-point output of rank >= 2 (scores, not a label), else the first."""
    for t in outputs:
        dtype = np.dtype(t.dtype) if t.dtype is not None else None
        if (dtype is None or dtype.kind == "f") and (t.shape is None or len(t.shape) >= 2):
            return t
    return outputs[0]


def strip_softmax(program: Program, output: str | None = None) -> Program:
    graph = program.graph
    names = [t.name for t in graph.outputs]
    if output is not None and output not in names:
        raise LrpcError(f"output {output!r} not found; the model's outputs are {names}")
    tensor = graph.outputs[names.index(output)] if output else _default_output(graph.outputs)
    program.output_name = tensor.name
    while len(tensor.inputs) == 1 and tensor.inputs[0].op in SOFTMAX | {"Identity"}:
        node = tensor.inputs[0]
        tensor = node.inputs[0]
        if node.op in SOFTMAX:
            program.notes.append(f"relevance starts at {tensor.name!r}, before {node.op} {node.name!r}")
    program.start_name = tensor.name
    return program
