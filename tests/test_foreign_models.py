"""Models that did not come from torch.onnx: Keras via tf2onnx, scikit-learn via skl2onnx,
the onnx wheel's own backend test models (opset 6-era PyTorch exports, IR 3) and a
hand-built opset-9 model in the IR-3 style (initializers also listed as graph inputs).

The Keras model is committed under ``tests/data/`` (``make_keras_cnn.py`` wrote it; it is
not run here, TensorFlow being far too heavy for the suite). The scikit-learn model is
trained and converted here, on scikit-learn's bundled digits (needs skl2onnx; 1.20.0
works with onnx 1.23). The backend models are checked as they are and once more with a
Flatten appended, so that their ops are exercised under a ``[batch, features]`` start.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support.cases import PRESET_NAMES
from support.cases import preset as make_preset

DATA = Path(__file__).resolve().parent / "data"
RELEVANCE = "relevance"
TARGET = "lrp_target"
CONSERVING = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)))



def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the intended "lrp_target appears in graph inputs" warning
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _per_sample_sum(r: np.ndarray) -> np.ndarray:
    return r.reshape(r.shape[0], -1).sum(axis=1)


# -- Keras (tf2onnx), channels-last input --------------------------------------------------


def _keras(stem: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / f"{stem}.onnx"))


def _keras_input() -> np.ndarray:
    return np.load(DATA / "keras_cnn_input.npy")


def _keras_reference(stem: str) -> np.ndarray:
    return np.load(DATA / f"{stem}_reference.npy")


def _keras_io(model: onnx.ModelProto) -> tuple[str, str]:
    return model.graph.input[0].name, model.graph.output[0].name


def test_keras_files_are_small_and_channels_last():
    for stem in ("keras_cnn", "keras_cnn_nobias"):
        assert (DATA / f"{stem}.onnx").stat().st_size < 100_000
        model = _keras(stem)
        assert len(model.graph.input) == 1
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value"), "the batch dimension must be dynamic"
        assert [d.dim_value for d in dims[1:]] == [16, 16, 3]
    x = _keras_input()
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32


@pytest.mark.parametrize("stem", ["keras_cnn", "keras_cnn_nobias"])
def test_keras_onnxruntime_matches_keras(stem):
    model = _keras(stem)
    name_in, name_out = _keras_io(model)
    out = _run(model, {name_in: _keras_input()})[name_out]
    np.testing.assert_allclose(out, _keras_reference(stem), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_keras_presets_compile_and_run(preset):
    model = _keras("keras_cnn")
    name_in, name_out = _keras_io(model)
    x = _keras_input()
    compiled = lrpc.compile(model, make_preset(preset))
    assert [i.name for i in compiled.graph.input][:1] == [name_in]
    assert [o.name for o in compiled.graph.output] == [name_out, RELEVANCE]
    outs = _run(compiled, {name_in: x})
    np.testing.assert_allclose(outs[name_out], _keras_reference("keras_cnn"), atol=1e-4, rtol=0)
    r = outs[RELEVANCE]
    assert r.shape == x.shape == (2, 16, 16, 3)
    assert r.dtype == x.dtype
    assert np.all(np.isfinite(r))
    assert np.any(r != 0)
    # one file, every batch size
    one = _run(compiled, {name_in: x[:1]})
    np.testing.assert_allclose(one[name_out], outs[name_out][:1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(one[RELEVANCE], r[:1], atol=1e-5, rtol=1e-4)


def test_keras_conservation_zero_bias():
    model = _keras("keras_cnn_nobias")
    name_in, name_out = _keras_io(model)
    x = _keras_input()
    compiled = lrpc.compile(model, CONSERVING)
    outs = _run(compiled, {name_in: x})
    np.testing.assert_allclose(outs[name_out], _keras_reference("keras_cnn_nobias"), atol=1e-4, rtol=0)
    r = outs[RELEVANCE]
    assert r.shape == x.shape
    np.testing.assert_allclose(_per_sample_sum(r), np.ones(len(x)), atol=1e-3, rtol=0)
    # chosen classes conserve too
    targets = np.array([3, 7], dtype=np.int64)
    r_t = _run(compiled, {name_in: x, TARGET: targets})[RELEVANCE]
    np.testing.assert_allclose(_per_sample_sum(r_t), np.ones(len(x)), atol=1e-3, rtol=0)
    assert not np.allclose(r_t, r)


def test_keras_lrp0_equals_tensorflow_gradient_x_input():
    """Without biases the network is piecewise linear and positively homogeneous: LRP-0
    from the logit itself is input * gradient, which TensorFlow computed (channels-last)."""
    model = _keras("keras_cnn_nobias")
    name_in, _ = _keras_io(model)
    x = _keras_input()
    compiled = lrpc.compile(model, CONSERVING, normalize_output_relevance=False)
    r = _run(compiled, {name_in: x})[RELEVANCE]
    want = np.load(DATA / "keras_cnn_nobias_gradient_x_input.npy")
    assert r.shape == want.shape == x.shape
    assert np.abs(r - want).max() <= 1e-4 * np.abs(want).max()
    logits = np.load(DATA / "keras_cnn_nobias_logits.npy")
    np.testing.assert_allclose(_per_sample_sum(r), logits.max(axis=1), rtol=1e-4, atol=1e-5)


# -- scikit-learn MLPClassifier (skl2onnx) -------------------------------------------------


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


@functools.cache
def _sklearn_mlp(zero_intercepts: bool):
    """(classifier, its skl2onnx conversion as bytes); probabilities without ZipMap."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=200, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    if zero_intercepts:
        for b in clf.intercepts_:
            b[:] = 0.0
    proto = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    return clf, proto.SerializeToString()


def _sklearn_logits(clf, x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        h = h @ w + b
        if i < len(clf.coefs_) - 1:
            h = np.maximum(h, 0.0)
    return h


def test_sklearn_conversion_matches_sklearn():
    clf, blob = _sklearn_mlp(False)
    model = onnx.load_from_string(blob)
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    x, _ = _digits()
    outs = _run(model, {"input": x[:50]})
    np.testing.assert_array_equal(outs["label"], clf.predict(x[:50]))
    np.testing.assert_allclose(outs["probabilities"], clf.predict_proba(x[:50]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_sklearn_presets_explain_probabilities(preset):
    clf, blob = _sklearn_mlp(False)
    x, _ = _digits()
    batch = x[:20]
    compiled = lrpc.compile(onnx.load_from_string(blob), make_preset(preset), output_name="probabilities")
    assert [o.name for o in compiled.graph.output] == ["label", "probabilities", RELEVANCE]
    outs = _run(compiled, {"input": batch})
    np.testing.assert_array_equal(outs["label"], clf.predict(batch))
    np.testing.assert_allclose(outs["probabilities"], clf.predict_proba(batch), atol=1e-5, rtol=0)
    r = outs[RELEVANCE]
    assert r.shape == batch.shape and r.dtype == np.float32
    assert np.all(np.isfinite(r)) and np.any(r != 0)


def test_sklearn_conservation_zero_intercepts():
    clf, blob = _sklearn_mlp(True)
    x, _ = _digits()
    batch = x[:20]
    logits = _sklearn_logits(clf, batch)
    predicted = logits.argmax(axis=1)

    normalized = lrpc.compile(onnx.load_from_string(blob), CONSERVING, output_name="probabilities")
    outs = _run(normalized, {"input": batch})
    np.testing.assert_array_equal(outs["label"], clf.predict(batch))
    np.testing.assert_array_equal(outs["label"], predicted)
    np.testing.assert_allclose(_per_sample_sum(outs[RELEVANCE]), np.ones(len(batch)), atol=1e-3, rtol=0)

    raw = lrpc.compile(
        onnx.load_from_string(blob), CONSERVING, output_name="probabilities",
        normalize_output_relevance=False,
    )
    r = _run(raw, {"input": batch})[RELEVANCE]
    explained = logits[np.arange(len(batch)), predicted]
    np.testing.assert_allclose(_per_sample_sum(r), explained, rtol=1e-3, atol=1e-3)


# -- the onnx wheel's backend test models (pytorch-converted) -------------------------------

BACKEND = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "pytorch-converted"
BACKEND_MODELS = sorted(p.name for p in BACKEND.iterdir() if (p / "model.onnx").is_file()) if BACKEND.is_dir() else []


def _load_pb(path: str) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_tensor(path))


def test_backend_models_are_there():
    assert len(BACKEND_MODELS) > 50, f"no pytorch-converted models under {BACKEND}"


def _backend_case(name: str):
    """(model, input names, inputs, expected outputs by name) of one pytorch-converted test model."""
    folder = BACKEND / name
    model = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name for t in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in initializers]
    data = folder / "test_data_set_0"
    inputs = [_load_pb(p) for p in sorted(glob.glob(str(data / "input_*.pb")))]
    expected = [_load_pb(p) for p in sorted(glob.glob(str(data / "output_*.pb")))]
    output_names = [o.name for o in model.graph.output]
    assert len(inputs) == len(input_names) and len(expected) == len(output_names)
    return model, input_names, inputs, dict(zip(output_names, expected))


def _compiles_or_refuses_cleanly(label: str, model, input_names, inputs, expected: dict) -> None:
    """Either an lrpc.LrpcError, or a compiled file that onnxruntime runs, with the model's own
    outputs unchanged and a finite relevance shaped like the input; anything else fails."""
    try:
        compiled = lrpc.compile(model)
    except lrpc.LrpcError:
        return  # a clean refusal is fine
    except Exception as error:
        raise AssertionError(
            f"{label}: lrpc.compile raised {type(error).__name__} (not an lrpc.LrpcError): {error}"
        ) from error
    try:
        outs = _run(compiled, dict(zip(input_names, inputs)))
    except Exception as error:
        raise AssertionError(
            f"{label}: onnxruntime cannot run the compiled model: {type(error).__name__}: {error}"
        ) from error
    for out_name, want in expected.items():
        assert out_name in outs, f"{label}: the compiled model lost output {out_name!r}"
        np.testing.assert_allclose(outs[out_name], want, atol=1e-4, rtol=0, err_msg=f"{label}: output {out_name!r}")
    assert RELEVANCE in outs, f"{label}: no {RELEVANCE!r} output"
    r = outs[RELEVANCE]
    # integer token ids: relevance is reported at their embedding, one vector per id
    x = inputs[0]
    expected = x.shape if x.dtype.kind == "f" else (*x.shape, r.shape[-1])
    assert r.shape == expected, f"{label}: relevance {r.shape} vs input {x.shape}"
    assert np.all(np.isfinite(r)), f"{label}: relevance is not finite"


@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_backend_model_compiles_or_refuses_cleanly(name):
    _compiles_or_refuses_cleanly(name, *_backend_case(name))


def _rank_gt2_single_output(name: str) -> bool:
    folder = BACKEND / name
    outputs = sorted(glob.glob(str(folder / "test_data_set_0" / "output_*.pb")))
    return len(outputs) == 1 and _load_pb(outputs[0]).ndim > 2


BACKEND_MODELS_RANK_GT2 = [n for n in BACKEND_MODELS if _rank_gt2_single_output(n)]


@pytest.mark.parametrize("name", BACKEND_MODELS_RANK_GT2)
def test_backend_model_with_flatten_head(name):
    """The same models with a Flatten appended, so the relevance start is [batch, features]
    and the ops themselves (Conv1d/3d, groups, dilations, pooling, BatchNorm, PReLU, Pad, ...)
    are compiled rather than refused for their output rank. Same acceptance as above."""
    model, input_names, inputs, expected = _backend_case(name)
    flat = next(iter(expected.values()))
    flat = flat.reshape(flat.shape[0], -1)
    model.graph.node.append(helper.make_node("Flatten", [model.graph.output[0].name], ["flat"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, list(flat.shape)))
    _compiles_or_refuses_cleanly(f"{name} + Flatten", model, input_names, inputs, {"flat": flat})


# -- an old-opset model: opset 9, IR 4, initializers also listed as graph inputs ------------


def _old_opset_cnn(zero_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w1 = rng.normal(0.0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    b1 = (np.zeros(4) if zero_bias else rng.normal(0.0, 0.1, 4)).astype(np.float32)
    w2 = rng.normal(0.0, 0.3, (5, 4 * 4 * 4)).astype(np.float32)
    b2 = (np.zeros(5) if zero_bias else rng.normal(0.0, 0.1, 5)).astype(np.float32)
    params = {"conv.weight": w1, "conv.bias": b1, "fc.weight": w2, "fc.bias": b2}
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "old_opset_cnn",
        # IR-3-era files list every initializer as a graph input as well
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])]
        + [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in params.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="handmade")
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def test_old_opset_model_compiles_and_keeps_outputs():
    model = _old_opset_cnn(zero_bias=False)
    x = np.random.default_rng(4).normal(0.0, 1.0, (3, 1, 8, 8)).astype(np.float32)
    want = _run(model, {"x": x})["y"]
    for name in PRESET_NAMES:
        compiled = lrpc.compile(model, make_preset(name))
        assert compiled.ir_version <= 13
        assert max(o.version for o in compiled.opset_import if o.domain in ("", "ai.onnx")) >= 17
        outs = _run(compiled, {"x": x})
        np.testing.assert_allclose(outs["y"], want, atol=1e-5, rtol=0)
        r = outs[RELEVANCE]
        assert r.shape == x.shape and np.all(np.isfinite(r)) and np.any(r != 0)


def test_old_opset_model_conserves():
    model = _old_opset_cnn(zero_bias=True)
    x = np.random.default_rng(5).normal(0.0, 1.0, (3, 1, 8, 8)).astype(np.float32)
    compiled = lrpc.compile(model, CONSERVING)
    outs = _run(compiled, {"x": x})
    np.testing.assert_allclose(outs["y"], _run(model, {"x": x})["y"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(_per_sample_sum(outs[RELEVANCE]), np.ones(len(x)), atol=1e-3, rtol=0)
