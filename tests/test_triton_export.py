"""``lrpc export triton``: a model repository entry for Triton's onnxruntime backend.

The config is read back with the protobuf schema Triton itself uses (``tritonclient``'s
``model_config_pb2``), and checked against the compiled file's own inputs and outputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import lrpc

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    return {mode: lrpc.compile_file(DIGITS / "digits_cnn.onnx", folder / f"{mode}.lrp.onnx", labels=True,
                                    target_input=mode) for mode in ("optional", "required")}


@pytest.mark.parametrize("mode", ["optional", "required"])
def test_the_config_declares_what_the_file_takes_and_returns(cli, compiled, tmp_path, mode):
    done = cli("export", "triton", compiled[mode], tmp_path / "repo", "--model-name", "digits", "--gpu",
               "--max-batch-size", "16")
    assert done.code == 0, done.err
    folder = tmp_path / "repo" / "digits"
    config = read_config(folder)
    assert (config.name, config.platform, config.max_batch_size) == ("digits", "onnxruntime_onnx", 16)
    FP32, INT64 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64
    inputs = {i.name: i for i in config.input}
    assert (inputs["input"].data_type, list(inputs["input"].dims)) == (FP32, [1, 8, 8])
    target = inputs["lrp_target"]
    assert (target.data_type, list(target.dims), list(target.reshape.shape)) == (INT64, [1], [])
    assert target.optional == (mode == "optional")  # a required target is a plain input every client must send
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {"probabilities": (FP32, [10]), "relevance": (FP32, [1, 8, 8]), "lrp_class": (INT64, [1]),
                       "lrp_logit": (FP32, [1])}
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)]
    # the file in the repository is the compiled file: same answers
    x = np.load(DIGITS / "samples.npy")[:3]
    feeds = {"input": x, "lrp_target": np.array([2, -1, 7], np.int64)}
    a = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(compiled[mode]), providers=["CPUExecutionProvider"]).run(None, feeds)
    for got, want in zip(a, b):
        np.testing.assert_array_equal(got, want)


def test_cpu_instances_by_default_and_a_second_export_replaces_the_first(cli, compiled, tmp_path):
    for batch in ("8", "32"):
        assert cli("export", "triton", compiled["optional"], tmp_path, "-q", "--max-batch-size", batch).code == 0
    config = read_config(tmp_path / "lrpc")
    assert config.max_batch_size == 32
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrpc"]  # no temporaries left beside it


def test_a_model_that_is_not_compiled_is_refused(cli, tmp_path):
    done = cli("export", "triton", DIGITS / "digits_cnn.onnx", tmp_path / "repo")
    assert done.code == 2
    assert done.err.strip().splitlines() == [f"lrpc: error: {DIGITS / 'digits_cnn.onnx'}: not a compiled file; "
                                             "run lrpc compile first"]
    assert not (tmp_path / "repo" / "lrpc").exists()


def test_a_model_with_a_fixed_batch_is_not_batched_by_triton(cli, tmp_path):
    """Triton can only batch along a dynamic first axis: a model exported with batch 1
    baked in gets max_batch_size 0, its own full shapes and no dynamic batching."""
    import onnx

    model = onnx.load(DIGITS / "digits_cnn.onnx")
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "fixed.onnx")
    lrpc.compile_file(tmp_path / "fixed.onnx", tmp_path / "fixed.lrp.onnx", target_input="required")
    assert cli("export", "triton", tmp_path / "fixed.lrp.onnx", tmp_path / "repo", "-q").code == 0
    config = read_config(tmp_path / "repo" / "lrpc")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    inputs = {i.name: (list(i.dims), i.HasField("reshape")) for i in config.input}
    assert inputs == {"input": ([1, 1, 8, 8], False), "lrp_target": ([-1], False)}
    assert {o.name: list(o.dims) for o in config.output} == {"probabilities": [1, 10], "relevance": [1, 1, 8, 8]}


def test_a_file_of_several_targets_is_refused(cli, tmp_path):
    lrpc.compile_file(DIGITS / "digits_cnn.onnx", tmp_path / "k.lrp.onnx", targets=2)
    done = cli("export", "triton", tmp_path / "k.lrp.onnx", tmp_path / "repo")
    assert done.code == 2
    assert done.err.strip().splitlines() == [f"lrpc: error: {tmp_path / 'k.lrp.onnx'}: compiled with --targets 2; "
                                             "servers take one target per sample (compile without --targets)"]
