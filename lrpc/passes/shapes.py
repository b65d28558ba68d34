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
    for name in ("input_name", "explained_name", "output_name", "start_name", "position"):
        setattr(new, name, getattr(program, name))
    new.notes = program.notes
    return new
