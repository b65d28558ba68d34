"""Fuse BatchNormalization into the Conv or Gemm right before it (``canonize``).

``BN(conv(x)) = conv'(x)`` with ``W' = W·s`` and ``b' = (b - mean)·s + beta`` per output
channel, ``s = gamma / sqrt(var + eps)``. The fused layer then gets the convolution's
rule, as in Zennit's and RelevancePropagation.jl's canonizers. A BatchNormalization
with nothing linear before it stays, as a normalization layer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value


def _bn_affine(bn: gs.Node):
    values = [constant_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (v.astype(np.float64) for v in values)
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def _fusable_producer(graph_outputs: set, bn: gs.Node) -> gs.Node | None:
    x = bn.inputs[0]
    if len(x.inputs) != 1 or len(x.outputs) != 1 or x.name in graph_outputs:
        return None
    producer = x.inputs[0]
    if producer.op not in ("Conv", "Gemm") or constant_value(producer.inputs[1]) is None:
        return None
    if len(producer.inputs) > 2 and producer.inputs[2].name and constant_value(producer.inputs[2]) is None:
        return None
    if producer.op == "Gemm":
        if int(producer.attrs.get("transA", 0)):
            return None
        if len(producer.inputs) > 2 and producer.inputs[2].name:
            bias = constant_value(producer.inputs[2])
            if bias.ndim == 2 and bias.shape[0] != 1:
                return None  # a per-row bias is not a per-channel one
    return producer


def fuse_batchnorm(program: Program) -> Program:
    graph = program.graph
    outputs = {t.name for t in graph.outputs}
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = _fusable_producer(outputs, bn)
        affine = _bn_affine(bn) if producer is not None else None
        if affine is None:
            continue
        scale, shift = affine
        weight = constant_value(producer.inputs[1])
        dtype = weight.dtype
        has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
        if producer.op == "Conv":
            new_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            bias = constant_value(producer.inputs[2]) if has_bias else np.zeros(weight.shape[0])
        else:  # Gemm: y = alpha * x op(B) + beta * C; output channels are op(B)'s columns
            trans_b = int(producer.attrs.get("transB", 0))
            alpha = float(producer.attrs.get("alpha", 1.0))
            beta = float(producer.attrs.get("beta", 1.0))
            new_w = weight * (scale[:, None] if trans_b else scale[None, :]) * alpha
            out_features = weight.shape[0] if trans_b else weight.shape[1]
            c = constant_value(producer.inputs[2]) if has_bias else np.zeros(out_features)
            bias = np.broadcast_to(beta * c, (1, out_features)).reshape(out_features)
            producer.attrs["alpha"], producer.attrs["beta"] = 1.0, 1.0
        new_b = bias * scale + shift
        # named after the BatchNorm's output tensor: unique, unlike (optional) node names
        base = bn.outputs[0].name
        producer.inputs[1] = gs.Constant(f"{base}/bn_fused_weight", new_w.astype(dtype))
        b_const = gs.Constant(f"{base}/bn_fused_bias", new_b.astype(dtype))
        if has_bias:
            producer.inputs[2] = b_const
        else:
            producer.inputs.append(b_const)
        # the fused layer writes the BatchNorm's output tensor; the BatchNorm goes away
        producer.outputs[0] = bn.outputs[0]
        bn.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return program
