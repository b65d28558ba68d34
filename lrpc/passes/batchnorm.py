"""Fuse BatchNormalization into the Conv or Gemm right before it (``canonize``).

``BN(conv(x)) = conv'(x)`` with ``W' = W·s`` and ``b' = (b - mean)·s + beta`` per output
channel, ``s = gamma / sqrt(var + eps)``. The fused layer then gets the convolution's
rule, as in Zennit's and RelevancePropagation.jl's canonizers. A BatchNormalization
with nothing linear before it stays, as a normalization layer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Program, constant_value, static_shape


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


def _channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as one value per channel (axis 1) if it broadcasts only along that axis."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)


def _out_channels(node: gs.Node) -> int | None:
    if node.op == "Conv":
        return constant_value(node.inputs[1]).shape[0]
    if node.op == "Gemm":
        w = constant_value(node.inputs[1])
        return w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
    return constant_value(node.inputs[1]).size  # BatchNormalization scale


def _set_param(node: gs.Node, slot: int, value: np.ndarray, dtype, tag: str) -> None:
    const = gs.Constant(f"{node.outputs[0].name}/{tag}", value.astype(dtype))
    if slot < len(node.inputs):
        node.inputs[slot] = const
    else:
        node.inputs.append(const)


def _fold_affine(producer: gs.Node, op: str, vec: np.ndarray, tag: str) -> None:
    """``producer(x) * vec`` or ``producer(x) + vec``, as a new ``producer``."""
    dtype = constant_value(producer.inputs[1]).dtype
    if producer.op == "BatchNormalization":  # y = (x - mean) / sd * gamma + beta
        gamma, beta = (constant_value(t).astype(np.float64) for t in producer.inputs[1:3])
        if op == "Mul":
            _set_param(producer, 1, gamma * vec, dtype, f"{tag}_scale")
            beta = beta * vec
        else:
            beta = beta + vec
        _set_param(producer, 2, beta, dtype, f"{tag}_bias")
        return
    weight = constant_value(producer.inputs[1]).astype(np.float64)
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
    channels = vec.size
    if producer.op == "Conv":
        bias = constant_value(producer.inputs[2]).astype(np.float64) if has_bias else np.zeros(channels)
        if op == "Mul":
            weight, bias = weight * vec.reshape(-1, *([1] * (weight.ndim - 1))), bias * vec
    else:  # Gemm: y = alpha * x op(B) + beta * C
        trans_b = int(producer.attrs.get("transB", 0))
        c = constant_value(producer.inputs[2]).astype(np.float64) if has_bias else np.zeros(channels)
        bias = np.broadcast_to(float(producer.attrs.get("beta", 1.0)) * c, (1, channels)).reshape(channels)
        weight = weight * float(producer.attrs.get("alpha", 1.0))
        producer.attrs["alpha"], producer.attrs["beta"] = 1.0, 1.0
        if op == "Mul":
            weight = weight * (vec[:, None] if trans_b else vec[None, :])
            bias = bias * vec
    if op == "Add":
        bias = bias + vec
    _set_param(producer, 1, weight, dtype, f"{tag}_weight")
    _set_param(producer, 2, bias, dtype, f"{tag}_bias")


def fuse_affine(program: Program) -> Program:
    """Fold a per-channel ``Mul``/``Add`` by a constant into the Conv, Gemm or
    BatchNormalization right before it (exporters write BatchNorm's affine part, or a
    scale layer, this way: ``Unsqueeze -> Mul -> Add`` with constants)."""
    graph = program.graph
    outputs = {t.name for t in graph.outputs}
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("Mul", "Add") or len(node.inputs) != 2 or not node.outputs:
                continue
            values = [constant_value(t) for t in node.inputs]
            if (values[0] is None) == (values[1] is None):
                continue
            x, c = (node.inputs[1], values[0]) if values[1] is None else (node.inputs[0], values[1])
            if len(x.inputs) != 1 or len(x.outputs) != 1 or x.name in outputs:
                continue
            producer = x.inputs[0]
            if producer.op not in ("Conv", "Gemm", "BatchNormalization") or constant_value(producer.inputs[1]) is None:
                continue
            if producer.op == "BatchNormalization" and any(constant_value(t) is None for t in producer.inputs[1:5]):
                continue
            if producer.op == "Gemm" and int(producer.attrs.get("transA", 0)):
                continue
            shape = static_shape(x)
            vec = _channel_vector(c, len(shape), _out_channels(producer)) if shape else None
            if vec is None:
                continue
            _fold_affine(producer, node.op, vec, f"affine_{node.op.lower()}")
            producer.outputs[0] = node.outputs[0]
            node.outputs.clear()
            changed = True
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return program
