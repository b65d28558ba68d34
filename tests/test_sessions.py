"""How lrpc opens a compiled file: by its path, read by onnxruntime itself, its metadata read
without its graph (``lrpc.files.read_metadata``), the ModelProto parsed only when asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lrpc
import lrpc.files
from lrpc.runtime.session import PACK_WEIGHTS_KEY, make_session
from support.graphs import small_cnn

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
SAMPLES = np.load(DIGITS / "samples.npy").astype(np.float32)[:3]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sessions") / "digits.lrp.onnx"
    return lrpc.compile_file(DIGITS / "digits_cnn.onnx", path, labels=True)


def test_the_metadata_is_read_as_onnx_reads_it(compiled, tmp_path):
    want = {p.key: p.value for p in onnx.load(str(compiled)).metadata_props}
    assert "lrpc.version" in want and lrpc.files.read_metadata(compiled) == want
    plain = tmp_path / "plain.onnx"
    model = small_cnn(seed=0)
    entry = model.metadata_props.add()
    entry.key, entry.value = "feature_names", "a,b"
    onnx.save(model, plain)
    assert lrpc.files.read_metadata(plain) == {"feature_names": "a,b"}


def test_unreadable_files_have_no_metadata(compiled, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(compiled.read_bytes()[: compiled.stat().st_size // 2])
    text = tmp_path / "text.onnx"
    text.write_text("not a model\n" * 100)
    for path in (truncated, text, tmp_path, tmp_path / "missing.onnx"):
        assert lrpc.files.read_metadata(path) == {}, path


def test_a_compiled_file_is_opened_without_parsing_it(compiled, monkeypatch):
    """The session comes from the path: lrpc never parses the file (its weights would be held
    twice more at the peak); ``model`` parses it on first use."""
    want = lrpc.LRP(onnx.load(str(compiled))).analyze(SAMPLES)

    def refuse(*args, **kwargs):
        raise AssertionError("the compiled file was parsed")

    with monkeypatch.context() as patch:
        patch.setattr(onnx, "load", refuse)
        patch.setattr(onnx, "load_model", refuse)
        patch.setattr(lrpc.files, "load_model", refuse)
        analyzer = lrpc.LRP(str(compiled))
        got = analyzer.analyze(SAMPLES)
    assert analyzer.path == str(compiled) and analyzer.metadata["lrpc.input"] == "input"
    np.testing.assert_array_equal(got.val, want.val)
    np.testing.assert_array_equal(got.output_selection, want.output_selection)
    assert analyzer.model.SerializeToString() == onnx.load(str(compiled)).SerializeToString()


def test_a_broken_compiled_file_is_one_line(compiled, tmp_path, cli):
    """A file that says it is compiled but that onnxruntime cannot load: one line, from the
    library and from the command line."""
    model = onnx.load(str(compiled))
    model.graph.node[0].input[0] = "nowhere"
    broken = tmp_path / "broken.lrp.onnx"
    broken.write_bytes(model.SerializeToString())
    with pytest.raises(lrpc.LrpcError, match="onnxruntime cannot open it") as raised:
        lrpc.LRP(str(broken))
    assert "\n" not in str(raised.value)
    np.save(tmp_path / "x.npy", SAMPLES)
    result = cli("explain", broken, tmp_path / "x.npy", "-o", tmp_path / "out")
    assert result.code == 2 and "onnxruntime cannot open it" in result.err and len(result.err_lines) == 1, result.err
    assert not (tmp_path / "out").exists()


def test_the_file_says_whether_its_sessions_pack_weights(compiled, tmp_path):
    """Decided once at compile time from the graph (the digits CNN's weights are mostly the
    Gemm's, which the relevance pass reads again: not packed); a path's session follows it."""
    assert lrpc.files.read_metadata(compiled)[PACK_WEIGHTS_KEY] == "false"
    options = make_session(compiled).get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    cnn = tmp_path / "cnn.lrp.onnx"
    lrpc.compile_file(_conv_heavy(), cnn)
    assert lrpc.files.read_metadata(cnn)[PACK_WEIGHTS_KEY] == "true"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left at onnxruntime's default
        make_session(cnn).get_session_options().get_session_config_entry("session.disable_prepacking")


def _conv_heavy() -> onnx.ModelProto:
    """A CNN whose weights are nearly all convolution kernels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((64, 3, 5, 5)).astype(np.float32) * 0.1, "k")
    dense = numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[2, 2, 2, 2]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [conv, dense])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_placeholder_weights_load_in_onnxruntime_without_the_weights(compiled, tmp_path):
    """The compile-time load check (``_verify_loads``) hands onnxruntime the graph with its
    large weights as zeros in a sparse file: the session loads and runs, nothing of the
    weights is written, and the model itself is left as it was. (Small constants stay: shape
    inference reads them.)"""
    import onnxruntime as ort

    model = onnx.load(str(compiled))
    before = model.SerializeToString()
    limit = 256
    path = lrpc.files.save_with_placeholder_weights(model, tmp_path, limit=limit)
    assert model.SerializeToString() == before
    light = onnx.load(str(path), load_external_data=False)
    stood_in = {t.name: t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    large = {t.name for t in model.graph.initializer if t.ByteSize() > limit}
    assert set(stood_in) == large and len(large) >= 2
    data = tmp_path / "placeholder_weights.bin"
    assert data.stat().st_size >= sum(int(np.prod(t.dims)) * 4 for t in stood_in.values())
    assert data.stat().st_blocks * 512 < 64 * 1024  # a hole, not written zeros
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, relevance = session.run(["probabilities", "relevance"], {"input": SAMPLES})
    assert probabilities.shape == (3, 10) and relevance.shape == SAMPLES.shape
