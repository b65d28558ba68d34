"""The compiled file is standard ONNX: other runtimes give the same relevance as onnxruntime.

Runtimes: onnxruntime CPU (the reference here), ``onnx.reference.ReferenceEvaluator`` (the
ONNX specification in numpy) and OpenVINO. Models: the bundled digits CNN, ResNet-18- and
MobileNetV2-style exports (7x7/2 stem, 3x3/2 max-pool, basic blocks; depthwise convs, ReLU6,
inverted residuals, sigmoid gates) and a ViT (AttnLRP). Each is run at batch 1 and 3, with
the arg-max and with chosen classes, and must agree to 1e-5 relative to onnxruntime.

OpenVINO folds initializers into constants, so an ``lrp_target`` with a default vanishes
there: the default file explains the arg-max (tested), and files that choose targets in
OpenVINO are compiled with ``target_input="required"``, which makes the target a plain
input every runtime lists.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import lrpc
from lrpc.emit import TARGET_NAME
from support import families, transformer_zoo
from support.runtimes import openvino_run

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODELS = ("digits", "matmul_mlp", "resnet18", "mobilenet_v2", "vit")
TOLERANCE = 1e-5


def matmul_mlp() -> onnx.ModelProto:
    """Linear layers as ``MatMul`` on a 3-D input, as torch exports them for sequences (the
    ViT case is where OpenVINO used to mix up a weight's forward and transposed uses)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal((5 * 24, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@functools.cache
def compiled(name: str, target_input: str) -> bytes:
    if name == "matmul_mlp":
        model, composite = matmul_mlp(), lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule()))
    elif name == "digits":
        model, composite = onnx.load(DIGITS / "digits_cnn.onnx"), lrpc.EpsilonPlus()
    elif name == "vit":
        model, composite = onnx.load_from_string(transformer_zoo.export_bytes("vit")), lrpc.AttnLRP()
    else:
        model, composite = onnx.load_from_string(families.family_onnx_bytes(name)), lrpc.EpsilonPlus()
    return lrpc.compile(model, composite, target_input=target_input).SerializeToString()


def samples(name: str, batch: int) -> np.ndarray:
    if name == "matmul_mlp":
        return np.random.default_rng(batch).standard_normal((batch, 5, 16)).astype(np.float32)
    if name == "digits":
        return np.load(DIGITS / "samples.npy")[:batch].astype(np.float32)
    if name == "vit":
        return transformer_zoo.example("vit", batch).pixels
    return families.example_input(name, batch, seed=3)


def onnxruntime_run(model: bytes, feeds: dict) -> dict:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def reference_run(model: bytes, feeds: dict) -> dict:
    evaluator = ReferenceEvaluator(onnx.load_from_string(model))
    return dict(zip(evaluator.output_names, evaluator.run(None, feeds)))


RUNTIMES = {"reference": reference_run, "openvino": openvino_run}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def input_name(model: bytes) -> str:
    return next(i.name for i in onnx.load_from_string(model).graph.input if i.name != TARGET_NAME)


def targets(name: str, x: np.ndarray, chosen: bool) -> np.ndarray:
    """-1 per row (the arg-max), or a class that is not the arg-max (so a target that is
    ignored shows)."""
    logits = onnxruntime_run(compiled(name, "required"), {input_name(compiled(name, "required")): x,
                                                           TARGET_NAME: np.full(len(x), -1, np.int64)})
    scores = logits[next(k for k in logits if k not in ("relevance",))]
    if not chosen:
        return np.full(len(x), -1, dtype=np.int64)
    return ((scores.argmax(1) + 1 + np.arange(len(x))) % scores.shape[1]).astype(np.int64)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("chosen", [False, True], ids=["argmax", "chosen"])
@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
@pytest.mark.parametrize("name", MODELS)
def test_runtime_agrees_with_onnxruntime(name, runtime, chosen, batch):
    model = compiled(name, "required")
    x = samples(name, batch)
    feeds = {input_name(model): x, TARGET_NAME: targets(name, x, chosen)}
    want = onnxruntime_run(model, feeds)
    got = RUNTIMES[runtime](model, feeds)
    assert set(got) == set(want)
    for output, value in want.items():
        assert got[output].shape == value.shape, output
        assert relative(got[output], value) <= TOLERANCE, f"{output}: {relative(got[output], value):.2e}"
    # the target took effect: chosen classes explain something else than the arg-max
    if chosen:
        argmax = onnxruntime_run(model, {**feeds, TARGET_NAME: np.full(batch, -1, np.int64)})
        assert relative(argmax["relevance"], want["relevance"]) > 1e-2


@pytest.mark.parametrize("name", ["digits", "resnet18"])
def test_reference_evaluator_runs_the_optional_target_file(name):
    """The default file (``lrp_target`` with a default) in the specification's own evaluator:
    omitted target = the arg-max, a given target is honoured."""
    optional, required = compiled(name, "optional"), compiled(name, "required")
    x = samples(name, 3)
    key = input_name(optional)
    for target in (None, targets(name, x, chosen=True)):
        feeds = {key: x} if target is None else {key: x, TARGET_NAME: target}
        want = onnxruntime_run(required, {key: x, TARGET_NAME: np.full(3, -1, np.int64) if target is None
                                          else target})
        got = reference_run(optional, feeds)
        assert relative(got["relevance"], want["relevance"]) <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["digits", "resnet18", "mobilenet_v2"])
def test_openvino_explains_the_arg_max_with_the_default_file(name, batch):
    """The default file (``lrp_target`` with a default) in OpenVINO, which folds the default
    into a constant and drops the input: it explains the arg-max, as onnxruntime does."""
    optional, required = compiled(name, "optional"), compiled(name, "required")
    x = samples(name, batch)
    key = input_name(optional)
    want = onnxruntime_run(required, {key: x, TARGET_NAME: np.full(batch, -1, np.int64)})
    got = openvino_run(optional, {key: x})
    assert got["relevance"].shape == want["relevance"].shape
    assert relative(got["relevance"], want["relevance"]) <= TOLERANCE


def test_a_required_target_is_a_plain_input_in_every_runtime():
    model = compiled("digits", "required")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", TARGET_NAME]
    assert session.get_overridable_initializers() == []
    assert ReferenceEvaluator(onnx.load_from_string(model)).input_names == ["input", TARGET_NAME]
    ov = pytest.importorskip("openvino")
    network = ov.Core().read_model(model, b"")
    assert sorted(i.get_any_name() for i in network.inputs) == ["input", TARGET_NAME]
