"""Raise old opsets to the minimum the emitter's ops need."""

from __future__ import annotations

from onnx import version_converter

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
    new = Program.from_model(upgraded)
    new.ir_version = max(program.ir_version, upgraded.ir_version)
    new.notes = program.notes + [f"opset {program.opset} upgraded to {minimum}"]
    return new
