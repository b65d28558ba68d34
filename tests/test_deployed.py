"""Models as deployed: quantized (onnxruntime.quantization: QDQ, QOperator, dynamic) and
half-precision (onnxconverter-common: float16, and bfloat16) forms of the same weights.

The compiled file's outputs are the deployed file's own (bit-identical); its relevance is
checked against Zennit on the network the quantized file computes, rebuilt in torch from
the ONNX operator definitions (tests/support/quantized_ref.py), and, for half precision,
against Zennit on the float32 model."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support import zoo
from support.export import export_onnx
from support.quantized_ref import quantized_relevance
from support.zennit_ref import composite, zennit_relevance

MODELS = ("lenet", "resnet")


def _run(model, feed):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


@functools.lru_cache(maxsize=None)
def forms(name: str) -> dict[str, bytes]:
    """The float32 export of zoo model ``name`` and its deployed forms, built once per run."""
    from onnxconverter_common import float16
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    directory = tempfile.mkdtemp()
    f32 = export_onnx(zoo.build(name, 0), zoo.example_input(name, 2), os.path.join(directory, "f32.onnx"),
                      dynamo=False)
    input_name = onnx.load(f32).graph.input[0].name

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: zoo.example_input(name, 4, seed=10 + i)} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    paths = {"float32": f32}
    for form, fmt in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        paths[form] = os.path.join(directory, f"{form}.onnx")
        quantize_static(f32, paths[form], Calibration(), quant_format=fmt)
    paths["dynamic"] = os.path.join(directory, "dynamic.onnx")
    quantize_dynamic(f32, paths["dynamic"])
    out = {form: open(p, "rb").read() for form, p in paths.items()}
    model = onnx.load(f32)
    out["float16"] = float16.convert_float_to_float16(model, keep_io_types=True).SerializeToString()
    out["float16-io"] = float16.convert_float_to_float16(model, keep_io_types=False).SerializeToString()
    out["bfloat16"] = _bfloat16(model).SerializeToString()
    return out


def _bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """bfloat16 weights, each dequantized by a Cast to float32 where it is read (the form
    mixed-precision exporters write for weight storage; onnxruntime's CPU kernels for most
    ops are float32 only)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    casts, stored = [], []
    for t in list(graph.initializer):
        if t.data_type == TensorProto.FLOAT and len(t.dims) > 1:
            values = numpy_helper.to_array(t)
            stored.append(helper.make_tensor(t.name + "_bf16", TensorProto.BFLOAT16, values.shape,
                                             values.astype(np.float32).ravel().tolist()))
            casts.append(helper.make_node("Cast", [t.name + "_bf16"], [t.name], to=TensorProto.FLOAT))
        else:
            stored.append(t)
    del graph.initializer[:]
    graph.initializer.extend(stored)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _input(name, form, n=5):
    x = zoo.example_input(name, n, seed=3)
    return x.astype(np.float16) if form == "float16-io" else x


@pytest.mark.parametrize("form", ["qdq", "qoperator", "dynamic", "float16", "float16-io", "bfloat16"])
@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_the_deployed_files_own(name, form):
    model = forms(name)[form]
    x = _input(name, form)
    feed = {onnx.load_from_string(model).graph.input[0].name: x}
    compiled = lrpc.compile(model, "EpsilonPlus", verbose=False)
    own = _run(model, feed)[0]
    out = _run(compiled, feed)
    assert np.array_equal(out[0], own)  # the deployed forward, untouched
    assert out[1].shape == x.shape and out[1].dtype == x.dtype
    assert np.isfinite(out[1]).all() and np.abs(out[1]).max() > 0


@pytest.mark.parametrize("preset", ["EpsilonPlus", "EpsilonPlusFlat"])
@pytest.mark.parametrize("name, form", [(name, form) for name in MODELS for form in ("qdq", "qoperator")]
                         + [("resnet", "dynamic")])
def test_quantized_relevance_matches_the_fake_quantized_reference(name, form, preset):
    """QOperator files come from the same calibration as QDQ ones: one reference for both."""
    x = _input(name, form)
    feed = {onnx.load_from_string(forms(name)[form]).graph.input[0].name: x}
    got = _run(lrpc.compile(forms(name)[form], preset, verbose=False), feed)[1]
    ref = quantized_relevance(onnx.load_from_string(forms(name)["qdq" if form == "qoperator" else form]), x, preset)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_quantized_relevance_is_not_the_float_models():
    """The reference above is not vacuous: int8 activations change the relevance."""
    x = _input("lenet", "qdq")
    ref = quantized_relevance(onnx.load_from_string(forms("lenet")["qdq"]), x, "EpsilonPlus")
    float_ref = zennit_relevance(zoo.build("lenet", 0), x, None, composite("EpsilonPlus"))
    assert np.abs(ref - float_ref).max() / np.abs(float_ref).max() > 1e-2


@pytest.mark.parametrize("form, tolerance", [("float16", 1e-2), ("float16-io", 1e-2), ("bfloat16", 5e-2)])
@pytest.mark.parametrize("name", ["lenet"])
def test_half_precision_relevance_is_the_float_models(name, form, tolerance):
    x = _input(name, form)
    feed = {onnx.load_from_string(forms(name)[form]).graph.input[0].name: x}
    got = _run(lrpc.compile(forms(name)[form], "EpsilonPlus", verbose=False), feed)[1].astype(np.float32)
    ref = zennit_relevance(zoo.build(name, 0), x.astype(np.float32), None, composite("EpsilonPlus"))
    assert np.abs(got - ref).max() / np.abs(ref).max() < tolerance


def test_relevance_dtype_float16_keeps_the_pass_in_half_precision():
    model = forms("lenet")["float16"]
    x = _input("lenet", "float16")
    compiled = lrpc.compile(model, "EpsilonPlus", verbose=False, relevance_dtype="float16")
    types = {t.data_type for t in compiled.graph.initializer if t.name.startswith("lrp/twin/")}
    assert TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types - {TensorProto.INT64}
    out = _run(compiled, {"input": x} if compiled.graph.input[0].name == "input" else {compiled.graph.input[0].name: x})
    assert out[1].dtype == np.float16
    ref = zennit_relevance(zoo.build("lenet", 0), x, None, composite("EpsilonPlus"))
    assert np.abs(out[1].astype(np.float32) - ref).max() / np.abs(ref).max() < 5e-2


def test_bad_relevance_dtype_is_one_line():
    with pytest.raises(lrpc.LrpcError, match="relevance_dtype must be one of float32, float16"):
        lrpc.compile(forms("lenet")["qdq"], relevance_dtype="int8", verbose=False)


def test_quantized_op_without_a_rule_is_named():
    """An unknown quantized op is listed by name, never as 'does not depend on this input'."""
    model = onnx.load_from_string(forms("lenet")["qoperator"])
    for node in model.graph.node:
        if node.op_type == "QLinearConv":
            node.op_type, node.domain = "QLinearFoo", "com.microsoft"
            break
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model, verbose=False)
    table = info.value.report.render() if hasattr(info.value.report, "render") else str(info.value.report)
    assert "QLinearFoo: quantized op without a rule" in table
    assert "does not depend" not in table


def test_matmul_nbits_weights_dequantize_as_onnxruntime_does():
    """int4 MatMulNBits (onnxruntime's MatMulNBitsQuantizer): the twin's weight equals what
    onnxruntime's own kernel multiplies with (read by feeding the identity), and the
    relevance is Zennit's on the float MLP with those weights."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    mlp = zoo.build("mlp", 0)
    x = zoo.example_input("mlp", 4, seed=3)
    # MatMul (not Gemm) layers with their bias Add, as transformer exports have them
    nodes, inits, previous = [], [], "x"
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(linears):
        inits += [numpy_helper.from_array(layer.weight.detach().numpy().T.copy(), f"w{i}"),
                  numpy_helper.from_array(layer.bias.detach().numpy(), f"b{i}")]
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        previous = f"a{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"]))
            previous = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 20])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", 5])], inits)
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain.ir_version = 8
    quantizer = MatMulNBitsQuantizer(onnx.load_from_string(plain.SerializeToString()), block_size=16,
                                     is_symmetric=False)
    quantizer.process()
    model = quantizer.model.model
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    name = model.graph.input[0].name
    compiled = lrpc.compile(model, "EpsilonPlus", verbose=False)
    out = _run(compiled, {name: x})
    assert np.array_equal(out[0], _run(model, {name: x})[0])
    # the dequantized weights, as onnxruntime computes them, into the torch reference
    reference = zoo.build("mlp", 0)
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        k = next(a.i for a in node.attribute if a.name == "K")
        single = helper.make_model(helper.make_graph(
            [node], "w", [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
            [t for t in model.graph.initializer if t.name in node.input]),
            opset_imports=list(model.opset_import))
        weight = _run(single, {node.input[0]: np.eye(k, dtype=np.float32)})[0]  # [K, N] = Wᵀ
        layer = next(m for m in reference.modules() if isinstance(m, torch.nn.Linear) and m.in_features == k
                     and m.out_features == weight.shape[1] and not getattr(m, "_set", False))
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight.T.copy()))
        layer._set = True
        dequantized = next(t for t in plain.graph.initializer if t.name == f"w{[m for m in reference.modules() if isinstance(m, torch.nn.Linear)].index(layer)}")
        dequantized.CopyFrom(numpy_helper.from_array(weight, dequantized.name))
    # the float model with the dequantized weights, compiled: the same relevance
    float_twin = _run(lrpc.compile(plain, "EpsilonPlus", verbose=False), {"x": x})[1]
    assert np.abs(out[1] - float_twin).max() / np.abs(float_twin).max() < 1e-5
    # and Zennit on it (its Linear holds the bias the ONNX file adds apart, hence the stabilizer's 1e-4)
    ref = zennit_relevance(reference, x, None, composite("EpsilonPlus"))
    assert np.abs(out[1] - ref).max() / np.abs(ref).max() < 1e-3
