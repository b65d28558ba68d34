"""Supporting new layers and activation functions (model checks, registration, skip_checks).

lrpc refuses models with ops it does not know, with a table of the offending nodes,
instead of returning a wrong explanation. Register an op once you know how relevance
should flow through it.

Run: python examples/custom_layers.py
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.registry import unregister


def model_with(op_type: str, **attrs) -> "onnx.ModelProto":
    """Dense(100 -> 20) -> <op_type> -> Dense(20 -> 10), like the Flux chain of the guide."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="/dense1/Gemm"),
            helper.make_node(op_type, ["h", *(["axis"] if op_type == "CumSum" else [])], ["a"],
                             name=f"/custom/{op_type}", **attrs),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1, name="/dense2/Gemm"),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 100])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(rng.standard_normal((20, 100)).astype(np.float32) * 0.1, "w1"),
            numpy_helper.from_array(np.zeros(20, np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((10, 20)).astype(np.float32) * 0.3, "w2"),
            numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
            numpy_helper.from_array(np.array(1, np.int64), "axis"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    x = np.random.default_rng(1).standard_normal((2, 100)).astype(np.float32)

    # 1. A layer lrpc does not know: the model check fails with a summary table.
    #    (`CumSum` stands for "MyLayer": any op without a registry entry.)
    running = model_with("CumSum")
    try:
        lrpc.LRP(running)
    except lrpc.UnsupportedModelError as error:
        print(error)
        print()

    # 2. Register it: a running sum is linear; its VJP is the running sum taken backwards.
    def cumsum_vjp(em, layer, inputs, params, s):
        return [em.sym(em.op("CumSum", [s, layer.node.inputs[1]], {"reverse": 1}, dtype=em.dtype))]

    lrpc.register_layer("CumSum", vjp=cumsum_vjp)
    analyzer = lrpc.LRP(running, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule())))
    print(analyzer)
    print("relevance sums:", analyzer.analyze(x).val.sum(axis=1))

    # 3. An unknown activation function: Softsign is refused until registered.
    soft = model_with("Softsign")
    try:
        lrpc.LRP(soft)
    except lrpc.UnsupportedModelError as error:
        print(str(error).splitlines()[-1])
    lrpc.register_activation("Softsign")
    print("after register_activation:", lrpc.LRP(soft).analyze(x).val.shape)

    # 4. Skipping the checks, at your own risk: unknown ops that keep the shape pass
    #    relevance through unchanged.
    unregister("Softsign")
    unregister("CumSum")
    skipped = lrpc.LRP(model_with("Softsign"), skip_checks=True)
    print("skip_checks:", skipped.analyze(x).val.shape)


if __name__ == "__main__":
    main()
