"""Raise old opsets to the minimum the emitter's ops need."""

from __future__ import annotations

import onnx
from onnx import numpy_helper, version_converter

from ..errors import ModelLoadError
from ..graph import Program

# ScatterElements(reduction="add") (MaxPool's VJP) needs 16; ReduceSum with axes as an
# input needs 13. 17 is also what current exporters write by default.
MIN_OPSET = 17


def upgrade_opset(program: Program, minimum: int = MIN_OPSET) -> Program:
    if program.opset >= minimum:
        return program
    model = program.to_model()
    try:
        upgraded = version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ModelLoadError(f"cannot upgrade opset {program.opset} to {minimum}: {str(exc).splitlines()[0]}") from None
    if program.opset < 7:
        upgraded = _prelu_slopes_per_channel(upgraded)
    return program.rebuilt(upgraded, f"opset {program.opset} upgraded to {minimum}")


def _prelu_slopes_per_channel(model: onnx.ModelProto) -> onnx.ModelProto:
    """Before opset 7 a 1-D PRelu slope of length C applied to axis 1; from 7 on, slopes
    broadcast from the right. The converter keeps ``[C]``: reshape it to ``[C, 1, ...]``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in [*inferred.graph.value_info, *inferred.graph.input]
             if vi.type.tensor_type.HasField("shape")}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "PRelu" or node.input[1] not in inits:
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        rank = ranks.get(node.input[0])
        if slope.ndim == 1 and slope.size > 1 and rank and rank > 2:
            fixed = numpy_helper.from_array(slope.reshape(-1, *([1] * (rank - 2))), inits[node.input[1]].name)
            inits[node.input[1]].CopyFrom(fixed)
    return model
