"""Inline model-local functions (the "flattening" of the design): afterwards every node
is an ONNX op that the registry can look up."""

from __future__ import annotations

import onnx.inliner

from ..graph import Program


def inline_functions(program: Program) -> Program:
    if not program.graph.functions:
        return program
    model = onnx.inliner.inline_local_functions(program.to_model())
    del model.functions[:]
    new = program.rebuilt(model, "model-local functions inlined")
    new.ir_version, new.opset = program.ir_version, program.opset
    return new
