"""Choose the explained input, where relevance starts and which logit it starts from.

``strip_softmax`` is the ONNX form of RelevancePropagation.jl's ``strip_softmax``: the
relevance starts at the logits feeding a final Softmax/LogSoftmax, while the compiled
file still returns the model's own outputs, softmax and all.

An integer input (token ids) cannot carry relevance: it is reported at the output of its
embedding lookup (``Gather`` of a constant table), ``[N, T, H]``. Sequence outputs
``[N, T, V]`` (language models) are explained at one position, the last by default.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpcError
from ..graph import Program, dtype_kind, static_shape

SOFTMAX = {"Softmax", "LogSoftmax"}

# ops that carry token ids unchanged on their way to the embedding lookup
_ID_MOVERS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


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
    program.explained_name = _explained_tensor(inputs[names.index(program.input_name)])
    return program


def _explained_tensor(x: gs.Variable) -> str:
    kind = dtype_kind(x)
    if kind is None:
        return x.name
    if kind == "f":
        if _dtype_name(x) != "float32":
            raise LrpcError(f"input {x.name!r} is {_dtype_name(x)}; lrpc compiles float32 models (runtimes lack "
                            "the other precisions' kernels for the backward pass): convert the model to float32")
        return x.name
    if kind not in "iu":
        raise LrpcError(f"input {x.name!r} has dtype {np.dtype(x.dtype)}; lrpc explains floating-point inputs "
                        "and integer token ids (through their embedding)")
    lookups = embedding_lookups(x)
    if not lookups:
        raise LrpcError(f"input {x.name!r} holds integers that reach no embedding lookup (a Gather from a constant "
                        "table): relevance cannot be reported for it; choose another input with --input")
    if len(lookups) > 1:
        found = ", ".join(repr(n.name or n.outputs[0].name) for n in lookups)
        raise LrpcError(f"input {x.name!r} feeds {len(lookups)} embedding lookups ({found}); lrpc reports relevance "
                        "at one")
    return lookups[0].outputs[0].name


def _dtype_name(x) -> str:
    try:
        return np.dtype(x.dtype).name
    except TypeError:  # an ONNX type numpy lacks
        from onnx import helper

        return helper.tensor_dtype_to_string(int(x.dtype)).removeprefix("TensorProto.").lower()


def embedding_lookups(x: gs.Tensor) -> list[gs.Node]:
    """``Gather(table, ids)`` nodes reading ``x`` (through casts and reshapes) from a
    constant floating-point table."""
    found, frontier, seen = [], [x], set()
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is tensor \
                    and isinstance(node.inputs[0], gs.Constant) and dtype_kind(node.inputs[0]) == "f":
                found.append(node)
            elif node.op in _ID_MOVERS and node.inputs and node.inputs[0] is tensor:
                frontier.extend(node.outputs)
    return found


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


def choose_position(program: Program, position: int | None = None) -> Program:
    """Sequence outputs ``[N, T, V]`` are explained at one position (default: the last,
    where a language model predicts the next token); other outputs take none."""
    start = program.graph.tensors()[program.start_name]
    shape = static_shape(start)
    if shape is not None and len(shape) == 3:
        position = -1 if position is None else int(position)
        length = shape[1]
        if length is not None and not -length <= position < length:
            raise LrpcError(f"position {position} is out of range for {length} positions")
        program.position = position
    elif position is not None:
        raise LrpcError(f"a position applies to sequence outputs [batch, positions, classes]; "
                        f"{program.output_name!r} has shape {list(shape) if shape else 'unknown'}")
    return program
