"""Small ONNX graphs built by hand for tests that need exact control over names and ops."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_cnn(seed: int = 0, softmax: bool = False, extra_nodes=(), names: bool = True) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-GAP-Flatten-Gemm-Relu-Gemm on [N, 3, 8, 8], 10 classes.

    Node names follow the torch exporter's module paths (``/features/features.0/Conv``).
    Layers (flat index): 0 Conv, 1 MaxPool, 2 Conv, 3 GlobalAveragePool, 4 Flatten,
    5 Gemm, 6 Gemm.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.5

    inits = {
        "c1.w": w(4, 3, 3, 3), "c1.b": w(4), "c2.w": w(6, 4, 3, 3), "c2.b": w(6),
        "fc1.w": w(8, 6), "fc1.b": w(8), "fc2.w": w(10, 8), "fc2.b": w(10),
    }
    n = (lambda name: name) if names else (lambda name: "")
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["h1"], pads=[1, 1, 1, 1], name=n("/features/features.0/Conv")),
        helper.make_node("Relu", ["h1"], ["a1"], name=n("/features/features.1/Relu")),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name=n("/features/features.2/MaxPool")),
        helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["h2"], pads=[1, 1, 1, 1], name=n("/features/features.3/Conv")),
        helper.make_node("Relu", ["h2"], ["a2"], name=n("/features/features.4/Relu")),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"], name=n("/avgpool/GlobalAveragePool")),
        helper.make_node("Flatten", ["g"], ["f"], name=n("/Flatten")),
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["h3"], transB=1, name=n("/classifier/classifier.0/Gemm")),
        helper.make_node("Relu", ["h3"], ["a3"], name=n("/classifier/classifier.1/Relu")),
        helper.make_node("Gemm", ["a3", "fc2.w", "fc2.b"], ["logits"], transB=1, name=n("/classifier/classifier.2/Gemm")),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name=n("/Softmax")))
        outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])]
    nodes.extend(extra_nodes)
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def with_node_before_output(model, op_type: str, **attrs):
    """Insert ``op_type`` (one input, same shape) right before the last Gemm; can be repeated."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    idx = max(i for i, nd in enumerate(nodes) if nd.op_type == "Gemm")
    gemm = nodes[idx]
    src = gemm.input[0]
    new = f"{src}_{op_type.lower()}"
    extra = helper.make_node(op_type, [src], [new], name=f"/classifier/custom/{op_type}", **attrs)
    gemm.input[0] = new
    del m.graph.node[:]
    m.graph.node.extend(nodes[:idx] + [extra] + nodes[idx:])
    return m
