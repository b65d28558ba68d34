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
        if _dtype_name(x) not in ("float32", "float16"):
            raise LrpcError(f"input {x.name!r} is {_dtype_name(x)}; lrpc explains float32, float16 and bfloat16 "
                            "models (runtimes lack the other precisions' kernels for the backward pass)")
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
    constant floating-point table. A lookup only the sizes of which are read (onnxruntime's
    optimizer leaves one behind ``EmbedLayerNormalization`` for a ``Shape``) is none."""
    found, frontier, seen = [], [x], set()
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is tensor \
                    and isinstance(node.inputs[0], gs.Constant) and dtype_kind(node.inputs[0]) == "f":
                if not _sizes_only(node.outputs[0]):
                    found.append(node)
            elif node.op in _ID_MOVERS and node.inputs and node.inputs[0] is tensor:
                frontier.extend(node.outputs)
    return found


def _sizes_only(t: gs.Tensor) -> bool:
    return bool(t.outputs) and all(n.op in ("Shape", "Size") for n in t.outputs)


def _is_scores(t) -> bool:
    """A floating-point tensor output of rank >= 2 (scores, not a label or a map)."""
    return getattr(t, "type", "tensor_type") == "tensor_type" and dtype_kind(t) in (None, "f") and (
        t.shape is None or len(t.shape) >= 2)


def _default_output(graph):
    """The first floating-point output of rank >= 2; failing that, the scores a ZipMap
    turns into a map (scikit-learn's classifiers), which then become an output too."""
    for t in graph.outputs:
        if _is_scores(t):
            return t
    for t in graph.outputs:
        producer = t.inputs[0] if len(t.inputs) == 1 else None
        if producer is not None and producer.op == "ZipMap" and producer.inputs:
            scores = producer.inputs[0]
            if scores not in graph.outputs:
                graph.outputs.append(scores)
            return scores
    names = ", ".join(f"{t.name!r}" for t in graph.outputs)
    raise LrpcError(f"no output holds scores to explain (floating-point, [batch, classes, ...]): {names}")


#: output normalizations: relevance starts at their input, the logits
NORMALIZERS = {"Softmax", "LogSoftmax", "Sigmoid"}
#: ops that only rearrange values between the normalization and the output
_ORDERING = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity"}


def strip_softmax(program: Program, output: str | None = None) -> Program:
    """Relevance starts at the logits: before a final Softmax, LogSoftmax or Sigmoid, also
    when only shape ops (Flatten, Reshape, Squeeze, Transpose, Identity) follow it. Those
    shape ops are repeated on the logits, so the start has the output's layout and a
    target means the same class in both."""
    graph = program.graph
    names = [t.name for t in graph.outputs]
    if output is not None and output not in names:
        raise LrpcError(f"output {output!r} not found; the model's outputs are {names}")
    if output is not None and not _is_scores(graph.outputs[names.index(output)]):
        raise LrpcError(f"output {output!r} holds no scores (floating-point, [batch, classes, ...])")
    tensor = graph.outputs[names.index(output)] if output else _default_output(graph)
    program.output_name = tensor.name
    chain, current = [], tensor
    while len(current.inputs) == 1 and current.inputs[0].op in _ORDERING | NORMALIZERS:
        node = current.inputs[0]
        if node.op in NORMALIZERS:
            logits = node.inputs[0]
            program.notes.append(f"relevance starts at {logits.name!r}, before {node.op} {node.name!r}")
            program.start_name = _replay(graph, list(reversed(chain)), logits).name
            return program
        chain.append(node)
        current = node.inputs[0]
    program.start_name = tensor.name
    return program


def _replay(graph, nodes: list, tensor):
    """``nodes`` (shape ops) applied again to ``tensor``; returns the last output."""
    nodes = [n for n in nodes if n.op != "Identity"]
    for node in nodes:
        out = node.outputs[0]
        copy = gs.Variable(f"{out.name}/logits", dtype=tensor.dtype, shape=out.shape)
        graph.nodes.append(gs.Node(node.op, name=f"{node.name or node.op}/logits", attrs=dict(node.attrs),
                                   inputs=[tensor, *node.inputs[1:]], outputs=[copy]))
        tensor = copy
    if nodes:
        graph.toposort()
    return tensor


def choose_layout(program: Program, position: int | None = None) -> Program:
    """How a target picks the explained logit (``program.layout``):

    - ``flat``: outputs ``[N, K]`` or ``[N, K, 1, ...]``: class K;
    - ``sequence``: ``[N, T, V]`` of a sequence model (its explained tensor is
      ``[N, T, ...]``, or ``position`` is given): entry V at one position (default the last);
    - ``dense``: any other ``[N, K, ...]`` (segmentation, detection maps): channel K summed
      over all positions, or over the region the caller gives (``lrp_region``).
    """
    tensors = program.graph.tensors()
    start = tensors[program.start_name]
    shape = static_shape(start)
    rank = len(shape) if shape is not None else 2
    if rank <= 2 or all(d == 1 for d in shape[2:]):
        program.layout = "flat"
    elif rank == 3 and (position is not None or _same_positions(start.shape, tensors[program.explained_name].shape)):
        program.layout = "sequence"
    else:
        program.layout = "dense"
    if program.layout == "sequence":
        position = -1 if position is None else int(position)
        length = shape[1]
        if length is not None and not -length <= position < length:
            raise LrpcError(f"position {position} is out of range for {length} positions")
        program.position = position
    elif position is not None:
        raise LrpcError(f"a position applies to sequence outputs [batch, positions, classes]; "
                        f"{program.output_name!r} has shape {list(shape) if shape else 'unknown'}")
    return program


def _same_positions(out_shape, in_shape) -> bool:
    """Output ``[N, T, V]`` over input ``[N, T, ...]`` (tokens, or their embedding): the same
    length, or the same named dynamic axis."""
    return (in_shape is not None and out_shape is not None and len(in_shape) >= 2 and in_shape[1] is not None
            and in_shape[1] != "" and in_shape[1] == out_shape[1])
