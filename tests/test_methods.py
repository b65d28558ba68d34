"""The gradient methods' interface: expressions, parameters, quadratures, analyzers, the
command line, several targets, servers' configs and the refusals. Parity with Captum on
real models is in test_methods_captum.py, every op's exact VJP in test_gradient_ops.py."""

from __future__ import annotations

import json

import lrpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from onnx import TensorProto, helper

from lrpc import methods
from lrpc.errors import CompositeSyntaxError, LrpcError, ParameterError
from lrpc.expressions import parse_method
from support.graphs import small_cnn

X = np.random.default_rng(3).standard_normal((3, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods") / "cnn.onnx"
    onnx.save(small_cnn(seed=1), path)
    return path


def _torch_cnn(model: onnx.ModelProto) -> torch.nn.Module:
    """small_cnn in torch, with the file's weights: the reference of the gradients here."""
    w = {t.name: torch.tensor(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer}

    def forward(x):
        h = torch.relu(torch.nn.functional.conv2d(x, w["c1.w"], w["c1.b"], padding=1))
        h = torch.nn.functional.max_pool2d(h, 2)
        h = torch.relu(torch.nn.functional.conv2d(h, w["c2.w"], w["c2.b"], padding=1))
        h = h.mean((2, 3))
        h = torch.relu(h @ w["fc1.w"].T + w["fc1.b"])
        return h @ w["fc2.w"].T + w["fc2.b"]

    return forward


def _gradient(fn, x: np.ndarray, targets) -> np.ndarray:
    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt)
    picked = out[torch.arange(len(x)), torch.as_tensor(targets)].sum()
    return torch.autograd.grad(picked, xt)[0].numpy()


def _run(model: onnx.ModelProto, x, target=None) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input": x}
    if target is not None:
        feeds["lrp_target"] = np.asarray(target, dtype=np.int64)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _close(a, b, tol=1e-5):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) <= tol


# -- expressions and parameters --------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Gradient", "Gradient()"),
    ("InputTimesGradient()", "InputTimesGradient()"),
    ("SmoothGrad(samples=8, stdev=0.2, seed=3)", "SmoothGrad(samples=8, stdev=0.2, seed=3)"),
    ("IntegratedGradients(steps=16, method='riemann_left')",
     "IntegratedGradients(steps=16, baseline=0.0, method='riemann_left')"),
    ("GradCAM(layer='/features/features.4/Relu')", "GradCAM(layer='/features/features.4/Relu')"),
])
def test_method_expressions(text, expected):
    assert repr(parse_method(text)) == expected


@pytest.mark.parametrize("text, message", [
    ("SmoothGrad(samples=0)", "samples must be at least 1"),
    ("SmoothGrad(stdev=-1)", "stdev must not be negative"),
    ("IntegratedGradients(method='simpson')", "method must be one of"),
    ("IntegratedGradients(steps=1, method='riemann_trapezoid')", "needs at least 2 steps"),
    ("IntegratedGradients(baseline='x.png')", "baseline must be a number, an array or an .npy"),
    ("GradCAM()", "give the layer"),
    ("GradCAM(layer=1.5)", "layer must be an index"),
    ("EpsilonRule()", "unknown name 'EpsilonRule'"),
    ("__import__('os')", "unknown name '__import__'"),
    ("os.system('ls')", "unsupported syntax"),
])
def test_bad_method_expressions_name_the_problem(text, message):
    with pytest.raises((CompositeSyntaxError, ParameterError), match=message):
        parse_method(text)


@pytest.mark.parametrize("method", methods.QUADRATURES)
@pytest.mark.parametrize("steps", [2, 7, 32])
def test_quadratures_are_captums(method, steps):
    sizes, alphas = approximation_parameters(method)
    ours_alphas, ours_sizes = methods.quadrature(method, steps)
    np.testing.assert_allclose(ours_alphas, alphas(steps), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours_sizes, sizes(steps), rtol=0, atol=1e-12)


def test_a_baseline_from_an_npy_file(cnn_path, tmp_path):
    baseline = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "b.npy", baseline)
    model = onnx.load(cnn_path)
    out = _run(lrpc.compile(model, method=f"IntegratedGradients(steps=8, baseline='{tmp_path / 'b.npy'}')"),
               X, [1, 2, 3])
    from captum.attr import IntegratedGradients

    fn = _torch_cnn(model)
    ref = IntegratedGradients(fn).attribute(torch.tensor(X), baselines=torch.tensor(baseline)[None],
                                            target=[1, 2, 3], n_steps=8).numpy()
    assert _close(out["attribution"], ref)
    with pytest.raises(ParameterError, match="does not fit one sample"):
        lrpc.compile(model, method=methods.IntegratedGradients(baseline=np.zeros((2, 3, 8, 8))))


# -- the compiled file ---------------------------------------------------------------------------


def test_gradient_file_contract(cnn_path):
    compiled = lrpc.compile(cnn_path, method="Gradient()")
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["lrpc.method"] == "Gradient()" and meta["lrpc.relevance"] == "attribution"
    assert meta["lrpc.heatmap"] == "sensitivity" and "lrpc.composite" not in meta
    assert [o.name for o in compiled.graph.output] == ["logits", "attribution"]
    out = _run(compiled, X, [0, 5, 9])
    assert _close(out["attribution"], _gradient(_torch_cnn(onnx.load(cnn_path)), X, [0, 5, 9]))
    default = _run(compiled, X)  # no target: the arg-max
    assert _close(default["attribution"], _gradient(_torch_cnn(onnx.load(cnn_path)), X,
                                                    default["logits"].argmax(1)))


def test_several_targets_are_single_runs_stacked(cnn_path):
    model = onnx.load(cnn_path)
    both = _run(lrpc.compile(model, method="IntegratedGradients(steps=4)", targets=2), X,
                np.array([[1, 2], [3, 4], [5, 6]]))["attribution"]
    single = lrpc.compile(model, method="IntegratedGradients(steps=4)")
    first, second = (_run(single, X, [row[j] for row in ([1, 2], [3, 4], [5, 6])])["attribution"] for j in (0, 1))
    assert both.shape == (6, 3, 8, 8)
    np.testing.assert_allclose(both, np.concatenate([first, second]), rtol=1e-5, atol=1e-7)


def test_gradcam_by_index_name_and_tensor_agree(cnn_path):
    model = onnx.load(cnn_path)
    results = [_run(lrpc.compile(model, method=methods.GradCAM(layer=ref)), X, [1, 1, 1])["attribution"]
               for ref in (2, "/features/features.3/Conv", "h2")]
    assert results[0].shape == (3, 1, 4, 4)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    # against the definition, by autograd on the torch model at the second conv's output
    w = {t.name: torch.tensor(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer}
    x = torch.tensor(X)
    h = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w["c1.w"], w["c1.b"], padding=1)), 2)
    a = torch.nn.functional.conv2d(h, w["c2.w"], w["c2.b"], padding=1).detach().requires_grad_(True)
    out = torch.relu(torch.relu(a).mean((2, 3)) @ w["fc1.w"].T + w["fc1.b"]) @ w["fc2.w"].T + w["fc2.b"]
    g = torch.autograd.grad(out[:, 1].sum(), a)[0]
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).detach().numpy()
    assert _close(results[0], cam)


def test_lrp_only_options_are_refused_with_a_method(cnn_path):
    with pytest.raises(LrpcError, match="gradient method"):
        lrpc.compile(cnn_path, method="Gradient()", report=True)
    with pytest.raises(LrpcError, match="not both"):
        lrpc.compile(cnn_path, "EpsilonPlus", method="Gradient()")


def test_a_fixed_batch_is_refused_by_the_batched_methods(tmp_path):
    model = small_cnn(seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(LrpcError, match="fixed batch"):
        lrpc.compile(model, method="SmoothGrad(samples=4)")
    lrpc.compile(model, method="Gradient()")  # one forward: any batch


def test_gradients_pass_what_lrp_holds_constant():
    """A gate (x · σ(x·w)) is held constant by LRP, differentiated by the gradient methods."""
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["gate"]),
         helper.make_node("Mul", ["input", "gate"], ["logits"])],
        "gated", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    got = _run(lrpc.compile(model, method="Gradient()"), x, [0, 3])["attribution"]

    def fn(t):
        return t * torch.sigmoid(t @ torch.tensor(w))

    assert _close(got, _gradient(fn, x, [0, 3]))


# -- analyzers --------------------------------------------------------------------------------------


def test_analyzers_name_their_method_and_heatmap(cnn_path):
    expected = {lrpc.Gradient: "sensitivity", lrpc.InputTimesGradient: "attribution",
                lrpc.SmoothGrad: "sensitivity", lrpc.IntegratedGradients: "attribution"}
    for cls, heat in expected.items():
        explanation = cls(cnn_path).analyze(X, [1, 2, 3])
        assert explanation.analyzer == cls.__name__ and explanation.heatmap == heat
        assert explanation.val.shape == X.shape and list(explanation.output_selection) == [1, 2, 3]
    cam = lrpc.GradCAM(cnn_path, layer=2).analyze(X)
    assert cam.heatmap == "cam" and cam.val.shape == (3, 1, 4, 4)
    ig = lrpc.IntegratedGradients(cnn_path, steps=4, method="riemann_right")
    assert repr(ig) == "IntegratedGradients(steps=4, baseline=0.0, method='riemann_right')"


def test_a_compiled_method_file_is_reused_and_checked(cnn_path, tmp_path):
    path = tmp_path / "g.onnx"
    lrpc.compile_file(cnn_path, path, method="Gradient()")
    again = lrpc.Gradient(path).analyze(X, 4)
    direct = lrpc.Gradient(cnn_path).analyze(X, 4)
    np.testing.assert_array_equal(again.val, direct.val)
    assert lrpc.LRP(path).analyze(X).analyzer == "Gradient"  # any compiled file opens
    with pytest.raises(LrpcError, match="compiled for Gradient"):
        lrpc.IntegratedGradients(path)
    with pytest.raises(LrpcError, match="parameters are fixed"):
        lrpc.Gradient(path, seed=1)


def test_heatmap_presets_follow_the_explanation(cnn_path):
    from lrpc.heatmap import STYLES, heatmap, style

    assert style("sensitivity")["reduce"] == "norm" and style("cam", colormap="viridis")["colormap"] == "viridis"
    explanation = lrpc.Gradient(cnn_path).analyze(X)
    images = heatmap(explanation)
    by_hand = heatmap(explanation.val, **STYLES["sensitivity"])
    for a, b in zip(images, by_hand):
        np.testing.assert_array_equal(a, b)


# -- command line and servers -------------------------------------------------------------------------


def test_cli_compiles_and_explains_with_a_method(cli, cnn_path, tmp_path):
    out = tmp_path / "ig.onnx"
    result = cli("compile", str(cnn_path), "-o", str(out), "--method", "IntegratedGradients(steps=4)")
    assert result.code == 0 and "attribution" in result.out
    np.save(tmp_path / "x.npy", X)
    result = cli("explain", str(cnn_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "e"),
                 "--method", "GradCAM(layer=2)", "--target", "3")
    assert result.code == 0, result.err
    saved = np.load(tmp_path / "e" / "relevance.npz")
    assert saved["relevance"].shape == (3, 1, 4, 4)
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert len(summary) == 3 and (tmp_path / "e" / "heatmap_000.png").exists()
    bad = cli("compile", str(cnn_path), "-o", str(tmp_path / "x.onnx"), "--method", "Gradient", "-c", "EpsilonPlus")
    assert bad.code == 2 and bad.err_lines == ["lrpc: error: --method replaces LRP's --composite / --rules: "
                                               "give one of them"]


def test_triton_config_of_a_method_file(cli, cnn_path, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = tmp_path / "sg.onnx"
    lrpc.compile_file(cnn_path, path, method="SmoothGrad(samples=4, stdev=0.1)")
    assert cli("export", "triton", str(path), str(tmp_path / "repo")).code == 0
    config = text_format.Parse((tmp_path / "repo" / "lrpc" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs["attribution"] == [3, 8, 8] and config.max_batch_size > 0


def test_a_rounding_has_the_fake_quantization_gradient():
    """Q → DQ (uint8, zero point 3): 1 inside the integer range, 0 where it saturates, as
    torch's fake-quantization backward (a zero point of 0 is a ReLU the quantizer fused)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    scale, zero = 0.02, 3
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("MatMul", ["d", "w"], ["logits"])],
        "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.float32(scale), "s"), onnx.numpy_helper.from_array(np.uint8(zero), "z"),
         onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.standard_normal((3, 6)) * 3).astype(np.float32)  # beyond the range both ways
    got = _run(lrpc.compile(model, method="Gradient()"), x, [0, 1, 2])["attribution"]

    def fn(t):
        return torch.fake_quantize_per_tensor_affine(t, scale, zero, 0, 255) @ torch.tensor(w)

    expected = _gradient(fn, x, [0, 1, 2])
    assert (expected == 0).any() and (expected != 0).any()
    assert _close(got, expected)


@pytest.mark.parametrize("method", ["Gradient()", "IntegratedGradients(steps=8, method='riemann_trapezoid')",
                                    "SmoothGrad(samples=4, stdev=0.0)", "GradCAM(layer=2)"])
def test_method_files_run_in_openvino(cnn_path, method):
    """The files are standard ONNX: OpenVINO computes the same attribution (SmoothGrad's
    noise aside: each runtime draws its own)."""
    from support.runtimes import openvino_run

    compiled = lrpc.compile(cnn_path, method=method, target_input="required")
    feeds = {"input": X, "lrp_target": np.array([1, 4, 9], np.int64)}
    there = openvino_run(compiled.SerializeToString(), feeds)["attribution"]
    assert _close(there, _run(compiled, X, [1, 4, 9])["attribution"])


def test_the_gradient_check_names_what_has_no_derivative(cli, tmp_path):
    model = small_cnn(seed=0)
    ops = list(model.graph.node)
    last = next(i for i, n in enumerate(ops) if n.name.endswith("classifier.2/Gemm"))
    ops.insert(last, helper.make_node("ThresholdedRelu", ["a3"], ["t"], name="/classifier/custom/ThresholdedRelu"))
    ops[last + 1].input[0] = "t"
    del model.graph.node[:]
    model.graph.node.extend(ops)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lrpc.register_activation("ThresholdedRelu")  # LRP passes it; no derivative given
    try:
        result = cli("compile", str(path), "-o", str(tmp_path / "g.onnx"), "--method", "Gradient")
    finally:
        lrpc.registry.unregister("ThresholdedRelu")
    assert result.code == 2
    assert "no exact derivative of ThresholdedRelu is known" in result.out  # the table's row
    assert result.err_lines == ["lrpc: error: gradient model check failed: 1 node(s) without an exact derivative "
                                "(register one in Python: lrpc.register_activation(op, derivative)) or use "
                                "--skip-checks"]
