"""Split LayerNormalization into the normalization and its affine part (opt-in).

``LayerNormalization(x, γ, β)`` becomes ``LayerNormalization(x, 1) → Mul(γ) → Add(β)``, as
RelevancePropagation.jl's ``canonize`` splits ``LayerNorm`` into a LayerNorm without
affine transformation and a ``Scale`` layer: each part is then a layer of its own and
takes its own rule (``LayerNormRule`` on the normalization, any rule on the scale and
the bias). The compiled file computes the split form; its outputs equal the original's
to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value


def split_layernorm(program: Program) -> Program:
    graph = program.graph
    for node in [n for n in graph.nodes if n.op == "LayerNormalization" and len(n.inputs) >= 2]:
        gamma = constant_value(node.inputs[1])
        beta = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if gamma is None or (len(node.inputs) > 2 and node.inputs[2].name and beta is None):
            continue  # parameters computed at run time: leave the layer whole
        out = node.outputs[0]
        base = out.name
        normalized = gs.Variable(f"{base}/normalized", dtype=out.dtype, shape=out.shape)
        scaled = gs.Variable(f"{base}/scaled", dtype=out.dtype, shape=out.shape) if beta is not None else out
        x = node.inputs[0]
        node.inputs.clear()
        node.inputs.extend([x, gs.Constant(f"{base}/unit_scale", np.ones_like(gamma))])
        node.outputs.clear()
        node.outputs.append(normalized)
        prefix = node.name or base
        graph.nodes.append(gs.Node("Mul", name=f"{prefix}/scale", inputs=[normalized, gs.Constant(f"{base}/gamma", gamma)],
                                   outputs=[scaled]))
        if beta is not None:
            graph.nodes.append(gs.Node("Add", name=f"{prefix}/shift", inputs=[scaled, gs.Constant(f"{base}/beta", beta)],
                                       outputs=[out]))
        program.notes.append(f"split {node.name or base} into LayerNormalization, scale and shift")
    graph.toposort()
    return program
