"""Write arithmetic with a constant in affine form: ``x - c`` -> ``x + (-c)`` and
``x / c`` -> ``x * (1/c)``.

Rules modify a layer's ``bias`` and ``weight``; in affine form the constant *is* the
bias (or weight), so ``b⁺`` means what it says. (For ``x - c`` the bias is ``-c``.)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value


def constant_arithmetic_to_affine(program: Program) -> Program:
    for node in program.graph.nodes:
        if node.op not in ("Sub", "Div") or len(node.inputs) != 2:
            continue
        x, c = node.inputs
        value = constant_value(c)
        if value is None or constant_value(x) is not None or not np.issubdtype(value.dtype, np.floating):
            continue  # integer arithmetic (shape computations) has no reciprocal
        if node.op == "Sub":
            node.op, new = "Add", -value
        else:
            if np.any(value == 0):
                continue
            node.op, new = "Mul", (1.0 / value).astype(value.dtype)
        # named after the node's output: tensor names are unique, node names may be empty
        node.inputs[1] = gs.Constant(f"{node.outputs[0].name}/affine_{node.op.lower()}",
                                     np.asarray(new, dtype=value.dtype))
    program.graph.cleanup(remove_unused_graph_inputs=False)
    return program
