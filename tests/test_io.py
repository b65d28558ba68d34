"""Choosing what to explain: several inputs (--input) and several outputs (--output)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.cli import main
from support.cases import rand

W = rand(6, 4)
V = rand(5, 4)


def two_inputs_two_outputs():
    """logits = x @ W + y @ V (y is side information); aux = 2 * (x @ W); probs = softmax(logits)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("MatMul", ["y", "v"], ["yv"]),
        helper.make_node("Add", ["xw", "yv"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Mul", ["xw", "two"], ["aux"]),
    ]
    graph = helper.make_graph(
        nodes, "io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(V, "v"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture
def data():
    return {"x": rand(3, 6), "y": rand(3, 5)}


def epsilon_dense(a, w, z, r):
    return a * ((r / z) @ w.T)


def test_explain_the_second_input_with_the_first_as_a_constant(data):
    composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)))
    target = np.array([0, 1, 2])
    onehot = np.eye(4)[target]
    logits = data["x"] @ W + data["y"] @ V
    out = run(lrpc.compile(two_inputs_two_outputs(), composite, input_name="y"), {**data, "lrp_target": target})
    assert out["relevance"].shape == data["y"].shape
    # the Add splits the logit between the two branches; the x-branch share is a constant's
    r_yv = (data["y"] @ V) * onehot / logits
    np.testing.assert_allclose(out["relevance"], epsilon_dense(data["y"], V, data["y"] @ V, r_yv), rtol=1e-4, atol=1e-6)
    out_x = run(lrpc.compile(two_inputs_two_outputs(), composite), {**data, "lrp_target": target})
    assert out_x["relevance"].shape == data["x"].shape  # default: the first input


def test_explain_another_output(data):
    composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)))
    compiled = lrpc.compile(two_inputs_two_outputs(), composite, output_name="aux")
    out = run(compiled, {**data, "lrp_target": np.array([3, 3, 3])})
    # aux = 2 x W: its relevance sums to 1 and is x's share of column 3 of W
    np.testing.assert_allclose(out["relevance"].sum(axis=1), 1.0, rtol=1e-5)
    expected = data["x"] * W[:, 3] / (data["x"] @ W[:, 3])[:, None]
    np.testing.assert_allclose(out["relevance"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-6)  # other outputs unchanged


def test_unknown_input_or_output_names_are_one_line_errors(data, tmp_path, capsys):
    path = tmp_path / "io.onnx"
    path.write_bytes(two_inputs_two_outputs().SerializeToString())
    assert main(["compile", str(path), "--input", "z"]) == 2
    assert "input 'z' not found; the model's inputs are ['x', 'y']" in capsys.readouterr().err
    assert main(["compile", str(path), "--output", "nope", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "output 'nope' not found" in capsys.readouterr().err
    assert main(["compile", str(path), "--input", "y", "--output", "aux", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "does not depend on this input" in capsys.readouterr().out
    assert not (tmp_path / "o.onnx").exists()
