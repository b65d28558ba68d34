"""Static shape inference (ONNX's own), so VJPs can read shapes and broadcast axes."""

from __future__ import annotations

import onnx

from ..graph import Program


def infer_shapes(program: Program) -> Program:
    model = program.to_model()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort; the emitter reports what it misses
        return program
    new = Program.from_model(inferred)
    new.ir_version, new.opset = program.ir_version, program.opset
    new.input_name, new.output_name, new.start_name = program.input_name, program.output_name, program.start_name
    new.notes = program.notes
    return new
