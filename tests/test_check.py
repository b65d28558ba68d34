"""The model check, registration of new ops (LRP_CONFIG) and skip_checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import lrpc
from lrpc.registry import unregister
from support.graphs import small_cnn, with_node_before_output


def run(model, x, target):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x, "lrp_target": np.asarray(target, np.int64)})))


@pytest.fixture
def registry_guard():
    """Registrations are global; undo them after each test."""
    touched = []
    yield touched
    for op_type in touched:
        unregister(op_type)


def test_supported_model_passes_the_check():
    analysis = lrpc.compiler.analyze_model(small_cnn())
    assert analysis.report.ok
    assert [r.op_type for r in analysis.report.rows] == [
        "Conv", "Relu", "MaxPool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm"]


def test_unsupported_nodes_are_all_named_with_their_reason():
    model = with_node_before_output(with_node_before_output(small_cnn(), "Softsign"), "ThresholdedRelu")
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model)
    message = str(info.value)
    assert "/classifier/custom/Softsign" in message and "unsupported or unknown activation function Softsign" in message
    assert "/classifier/custom/ThresholdedRelu" in message
    assert "LRP model check failed: 2 nodes" in message
    failures = {r.name: r.status for r in info.value.report.failures}
    assert failures == {
        "/classifier/custom/Softsign": "unsupported or unknown activation function Softsign",
        "/classifier/custom/ThresholdedRelu": "unsupported or unknown activation function ThresholdedRelu",
    }


def test_unknown_layer_type():
    model = with_node_before_output(small_cnn(), "Hardmax", axis=1)
    with pytest.raises(lrpc.UnsupportedModelError, match="unknown layer type"):
        lrpc.compile(model)


def test_verbose_false_gives_only_the_summary_line():
    model = with_node_before_output(small_cnn(), "Softsign")
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model, verbose=False)
    assert "\n" not in str(info.value) and str(info.value).startswith("LRP model check failed")


def test_register_activation_lets_it_compile(registry_guard):
    model = with_node_before_output(small_cnn(), "Softsign")
    registry_guard.append("Softsign")
    lrpc.register_activation("Softsign")
    compiled = lrpc.compile(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-6))))
    out = run(compiled, np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32), [1, 2])
    assert out["relevance"].shape == (2, 3, 8, 8) and np.isfinite(out["relevance"]).all()


def test_register_layer_with_a_vjp(registry_guard):
    """``Neg`` is linear: y = -x; its VJP is -s. Registering it makes relevance flow
    exactly as through Mul by -1."""
    neg = with_node_before_output(small_cnn(), "Neg")
    registry_guard.append("Neg")
    lrpc.register_layer("Neg", vjp=lambda em, layer, inputs, params, s: [-s], kind="linear layer")
    mul = with_node_before_output(small_cnn(), "Mul")
    mul.graph.initializer.append(helper.make_tensor("minus_one", 1, [], [-1.0]))
    for node in mul.graph.node:
        if node.op_type == "Mul":
            node.input.append("minus_one")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-6)))
    got = run(lrpc.compile(neg, composite), x, [3, 4])["relevance"]
    ref = run(lrpc.compile(mul, composite), x, [3, 4])["relevance"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_register_layer_like_an_existing_op(registry_guard):
    model = with_node_before_output(small_cnn(), "Softsign")
    registry_guard.append("Softsign")
    lrpc.register_layer("Softsign", like="Relu")
    assert lrpc.compile(model) is not None


def test_skip_checks_passes_relevance_through_same_shape_unknown_ops():
    model = with_node_before_output(small_cnn(), "Softsign")
    with pytest.raises(lrpc.UnsupportedModelError):
        lrpc.compile(model)
    compiled = lrpc.compile(model, skip_checks=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(run(compiled, x, [0, 1])["relevance"]).all()


def test_skip_checks_cannot_pass_through_a_shape_change():
    model = small_cnn()
    for node in model.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.op_type, node.name = "GlobalLpPool", "/pool/GlobalLpPool"
    with pytest.raises(lrpc.UnsupportedModelError, match="GlobalLpPool.*cannot be passed through"):
        lrpc.compile(model, skip_checks=True)
