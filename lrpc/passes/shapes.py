"""Static shape inference (ONNX's own), so VJPs can read shapes and broadcast axes.

It runs on the model without its large weights (their shapes suffice), and the inferred
shapes and dtypes are written onto the graph's own tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph import Program


#: ops whose output has their input's shape, which ONNX's inference leaves unknown
#: (scikit-learn's Scaler): filled in first, so inference continues past them
SAME_SHAPE = {"Scaler"}


#: ops whose output has the rank of one input even where ONNX's inference cannot tell its
#: dims (GatherElements' indices computed inside an ``If``, as in DeBERTa's relative
#: positions): the rank is filled in and inference runs once more, so the ops after them
#: (a Transpose) know theirs
SAME_RANK = {"GatherElements": 0}


def infer_shapes(program: Program) -> Program:
    for node in program.graph.nodes:
        if node.op in SAME_SHAPE and node.inputs and node.outputs and node.inputs[0].shape is not None:
            out = node.outputs[0]
            if out.shape is None:
                out.shape = list(node.inputs[0].shape)
            if out.dtype is None:
                out.dtype = np.float32
    for _ in range(4):
        if not _run_onnx_inference(program) or not _fill_ranks(program):
            break
    return program


def _fill_ranks(program: Program) -> bool:
    filled = False
    for node in program.graph.nodes:
        slot = SAME_RANK.get(node.op)
        if slot is None or len(node.inputs) <= slot or not node.outputs or node.outputs[0].shape is not None:
            continue
        source = node.inputs[slot]
        if source.shape is not None:
            node.outputs[0].shape = [None] * len(source.shape)
            node.outputs[0].dtype = node.outputs[0].dtype or source.dtype
            filled = True
    return filled


def _run_onnx_inference(program: Program) -> bool:
    model = program.to_model(light=True)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort; the emitter reports what it misses
        return False
    tensors = program.graph.tensors()
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = tensors.get(info.name)
        if tensor is None or isinstance(tensor, gs.Constant) or not info.type.HasField("tensor_type"):
            continue
        kind = info.type.tensor_type
        if kind.elem_type:
            try:
                tensor.dtype = helper.tensor_dtype_to_np_dtype(kind.elem_type)
            except (KeyError, ValueError, TypeError):
                pass
        if kind.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim]
    return True
