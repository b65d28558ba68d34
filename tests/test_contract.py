"""The compiled file's contract (DESIGN.md, "The compiled model's contract").

A compiled file has the model's own inputs plus ``lrp_target`` (int64 ``[lrp_batch]``,
default ``[-1]`` = explain the arg-max), the model's own outputs unchanged plus
``relevance`` (shaped like the input), runs every batch size from one file, uses only
default-domain ops at an IR version current runtimes accept, and carries its settings
in ``metadata_props``. ``lrpc.LRP`` wraps such a file as is.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import lrpc
from support.graphs import small_cnn

MAX_IR_VERSION = 13  # onnxruntime refuses IR 14 (DESIGN.md, "Two facts measured here")
MIN_OPSET = 17
TARGET = "lrp_target"
RELEVANCE = "relevance"

MODELS = ("small_cnn", "small_cnn_softmax", "vgg")
BATCH_SIZES = (1, 2, 5)
CONSERVING = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)))


# -- models, compiled once per test session ------------------------------------------------


@functools.lru_cache(maxsize=None)
def _original_bytes(name: str) -> bytes:
    if name == "small_cnn":
        return small_cnn(0).SerializeToString()
    if name == "small_cnn_softmax":
        return small_cnn(0, softmax=True).SerializeToString()
    if name == "vgg":  # torch-exported (legacy exporter, opset 17, dynamic batch axis)
        from support.export import zoo_onnx_bytes

        return zoo_onnx_bytes("vgg")
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _compiled_bytes(name: str) -> bytes:
    return lrpc.compile(original(name)).SerializeToString()


def original(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_original_bytes(name))


def compiled(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_compiled_bytes(name))


def zero_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """small_cnn with every bias initializer (``*.b``) set to zero, for conservation."""
    for init in model.graph.initializer:
        if init.name.endswith(".b"):
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    return model


# -- running models in onnxruntime ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _session(payload: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # lrp_target is an input with an initializer default: ORT warns
    return ort.InferenceSession(payload, sess_options=options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = _session(model.SerializeToString())
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not weights (``lrp_target`` counts: its initializer is a default)."""
    initializers = {i.name for i in model.graph.initializer} - {TARGET}
    return [i for i in model.graph.input if i.name not in initializers]


def batch(model: onnx.ModelProto, n: int, seed: int = 0) -> np.ndarray:
    """A float32 batch of ``n`` samples shaped like the model's first input."""
    dims = runtime_inputs(model)[0].type.tensor_type.shape.dim[1:]
    return np.random.default_rng(seed).standard_normal((n, *[d.dim_value for d in dims])).astype(np.float32)


def relevance_of(model: onnx.ModelProto, x: np.ndarray, target=None) -> np.ndarray:
    feeds = {"input": x}
    if target is not None:
        feeds[TARGET] = np.asarray(target, dtype=np.int64)
    return run(model, feeds)[RELEVANCE]


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def per_sample_sum(r: np.ndarray) -> np.ndarray:
    return r.reshape(len(r), -1).sum(axis=1)


# -- inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_inputs_are_the_models_own_plus_lrp_target(name):
    model, lrp = original(name), compiled(name)
    own = runtime_inputs(model)
    assert [i.name for i in runtime_inputs(lrp)] == [i.name for i in own] + [TARGET]
    inputs = {i.name: i for i in lrp.graph.input}
    for i in own:
        assert inputs[i.name].type == i.type, f"input {i.name!r} changed its dtype or shape"
        batch_axis = inputs[i.name].type.tensor_type.shape.dim[0]
        assert batch_axis.dim_param and not batch_axis.HasField("dim_value"), "the batch axis must stay symbolic"

    target = inputs[TARGET].type.tensor_type
    assert target.elem_type == TensorProto.INT64
    assert len(target.shape.dim) == 1 and target.shape.dim[0].dim_param, "lrp_target must be 1-D"
    default = {i.name: numpy_helper.to_array(i) for i in lrp.graph.initializer}[TARGET]
    assert default.dtype == np.int64 and default.tolist() == [-1]  # the arg-max for every row (one -1:
    # OpenVINO folds the default into a constant and takes an empty one for one element)

    session = _session(lrp.SerializeToString())
    assert isinstance({i.name: i for i in session.get_inputs()}["input"].shape[0], str)
    # onnxruntime lists an input with an initializer default as an overridable initializer
    overridable = {i.name: i for i in session.get_overridable_initializers()}
    assert overridable[TARGET].type == "tensor(int64)"


@pytest.mark.parametrize("name", MODELS)
def test_default_target_explains_the_arg_max(name):
    lrp = compiled(name)
    x = batch(lrp, 5)
    logits = run(original("small_cnn" if name == "small_cnn_softmax" else name), {"input": x})["logits"]
    best = logits.argmax(axis=1)
    unfed = relevance_of(lrp, x)
    np.testing.assert_allclose(unfed, relevance_of(lrp, x, best), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(unfed, relevance_of(lrp, x, [-1] * 5), rtol=1e-6, atol=1e-7)
    assert np.abs(unfed).max() > 0


@pytest.mark.parametrize("name", MODELS)
def test_fed_target_explains_the_given_class_of_each_sample(name):
    lrp = compiled(name)
    x = batch(lrp, 5)
    targets = np.array([0, 3, 9, 1, 7])
    together = relevance_of(lrp, x, targets)
    for i, t in enumerate(targets):
        alone = relevance_of(lrp, x[i:i + 1], [t])
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    mixed = relevance_of(lrp, x[:2], [-1, 3])  # a negative entry still means "the arg-max"
    np.testing.assert_allclose(mixed[:1], relevance_of(lrp, x[:1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[1:], together[1:2], rtol=1e-5, atol=1e-6)


def test_an_empty_target_or_a_single_minus_one_explains_the_arg_max_of_every_row():
    lrp = compiled("small_cnn")
    x = batch(lrp, 5)
    want = relevance_of(lrp, x, [-1] * 5)
    for target in ([], [-1]):
        np.testing.assert_allclose(relevance_of(lrp, x, target), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("length", [1, 3, 7])
def test_a_target_of_the_wrong_length_fails_loudly(length):
    """A batching server merging requests with and without targets must not spread one
    request's class over the others: only [] (the arg-max) or one class per sample run."""
    lrp = compiled("small_cnn")
    with pytest.raises(Exception, match="Reshape|shape|[Ss]ize"):
        relevance_of(lrp, batch(lrp, 5), [1] * length)
    assert relevance_of(lrp, batch(lrp, 1), [2]).shape[0] == 1  # one sample, one target: fine


def test_a_required_target_is_an_input_every_runtime_lists():
    lrp = lrpc.compile(original("small_cnn"), target_input="required")
    assert TARGET not in {i.name for i in lrp.graph.initializer}
    session = _session(lrp.SerializeToString())
    assert TARGET in [i.name for i in session.get_inputs()] and not session.get_overridable_initializers()
    x = batch(lrp, 3)
    np.testing.assert_allclose(relevance_of(lrp, x, [-1, -1, -1]), relevance_of(compiled("small_cnn"), x),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(Exception, match="lrp_target"):
        session.run(None, {"input": x})


# -- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_the_models_own_plus_relevance(name):
    model, lrp = original(name), compiled(name)
    assert [o.name for o in lrp.graph.output] == [o.name for o in model.graph.output] + [RELEVANCE]
    outputs = {o.name: o for o in lrp.graph.output}
    for o in model.graph.output:
        assert outputs[o.name].type == o.type, f"output {o.name!r} changed its dtype or shape"
    assert outputs[RELEVANCE].type == runtime_inputs(model)[0].type


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_one_file_runs_every_batch_size_with_unchanged_outputs(name, n):
    model, lrp = original(name), compiled(name)
    x = batch(model, n, seed=n)
    expected = run(model, {"input": x})
    got = run(lrp, {"input": x})
    assert list(got) == list(expected) + [RELEVANCE]
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert got[RELEVANCE].shape == x.shape and got[RELEVANCE].dtype == x.dtype
    assert np.isfinite(got[RELEVANCE]).all() and np.abs(got[RELEVANCE]).max() > 0


def test_softmax_model_returns_probabilities_but_explains_the_logits():
    plain, soft = compiled("small_cnn"), compiled("small_cnn_softmax")
    x = batch(plain, 5)
    logits = run(plain, {"input": x})["logits"]
    out = run(soft, {"input": x})
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-5, atol=1e-7)
    # relevance starts at the logits: the same relevance as the model without softmax
    np.testing.assert_allclose(out[RELEVANCE], relevance_of(plain, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(relevance_of(soft, x, [2] * 5), relevance_of(plain, x, [2] * 5), rtol=1e-5, atol=1e-7)
    assert metadata(soft)["lrpc.relevance_start"] == "logits"


# -- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_file_is_standard_onnx_that_onnxruntime_loads(name):
    model, lrp = original(name), compiled(name)
    onnx.checker.check_model(lrp, full_check=True)
    assert {node.domain for node in lrp.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in lrp.opset_import} <= {"", "ai.onnx"}
    assert next(o.version for o in lrp.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
    assert lrp.ir_version <= MAX_IR_VERSION
    assert lrp.ir_version == model.ir_version
    _session(lrp.SerializeToString())


@pytest.mark.parametrize("ir_version", [8, 10, onnx.IR_VERSION])
def test_ir_version_is_kept_and_capped_at_what_runtimes_accept(ir_version):
    model = small_cnn(0)
    model.ir_version = ir_version  # onnx.IR_VERSION is the library default (14 with onnx 1.23)
    lrp = lrpc.compile(model)
    assert lrp.ir_version == min(ir_version, MAX_IR_VERSION)
    _session(lrp.SerializeToString())


def test_original_small_cnn_is_ir_8():
    assert compiled("small_cnn").ir_version == original("small_cnn").ir_version == 8


@pytest.mark.parametrize("name", ["small_cnn", "vgg"])
def test_compiled_file_holds_no_copies_of_the_weights(name, tmp_path):
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(_original_bytes(name))
    dst = lrpc.compile_file(src, tmp_path / f"{name}.lrp.onnx")
    before, after = _constant_bytes(onnx.load(src)), _constant_bytes(onnx.load(dst))
    # the backward graph adds small constants (axes, shapes, a pooling window's one-hot block), not weights
    assert after <= 1.1 * before + 4 * 1024, f"{before} -> {after} bytes of constants"
    assert dst.stat().st_size <= 1.1 * src.stat().st_size + 32 * 1024


def _constant_bytes(model) -> int:
    """Bytes held in initializers and Constant nodes."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.type == a.TENSOR]
    return sum(numpy_helper.to_array(t).nbytes for t in tensors)


@pytest.mark.parametrize("name", MODELS)
def test_metadata_names_composite_input_and_relevance_start(name):
    meta = metadata(compiled(name))
    assert meta["lrpc.composite"] == repr(lrpc.EpsilonPlusFlat())
    assert meta["lrpc.input"] == "input"
    assert meta["lrpc.relevance_start"] == "logits"
    custom = metadata(lrpc.compile(original(name), CONSERVING))
    assert custom["lrpc.composite"] == repr(CONSERVING)


def test_compile_leaves_the_given_model_untouched():
    model = small_cnn(0)
    before = model.SerializeToString()
    lrpc.compile(model)
    assert model.SerializeToString() == before


# -- normalize_output_relevance ------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, [0, 3, 9, 1, 7]], ids=["arg-max", "given"])
def test_relevance_sum_is_one_or_the_explained_logit(target):
    model = zero_biases(small_cnn(0))  # zero biases + Epsilon(1e-9): relevance is conserved
    x = batch(model, 5)
    logits = run(model, {"input": x})["logits"]
    chosen = logits.argmax(1) if target is None else np.asarray(target)
    explained = logits[np.arange(5), chosen]

    normalized = lrpc.compile(model, CONSERVING)
    unnormalized = lrpc.compile(model, CONSERVING, normalize_output_relevance=False)
    np.testing.assert_allclose(per_sample_sum(relevance_of(normalized, x, target)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(per_sample_sum(relevance_of(unnormalized, x, target)), explained, rtol=1e-4)
    assert metadata(normalized)["lrpc.normalize_output_relevance"] == "true"
    assert metadata(unnormalized)["lrpc.normalize_output_relevance"] == "false"

    analyzer = lrpc.LRP(model, CONSERVING, normalize_output_relevance=False)
    expl = analyzer.analyze(x, target)
    np.testing.assert_allclose(per_sample_sum(expl.val), explained, rtol=1e-4)


# -- lrpc.LRP and Explanation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract") / "small_cnn_softmax.lrp.onnx"
    path.write_bytes(_compiled_bytes("small_cnn_softmax"))
    return path


@pytest.fixture(scope="module")
def analyzer(compiled_path):
    return lrpc.LRP(compiled_path)


def test_lrp_uses_an_already_compiled_file_as_is(analyzer, compiled_path):
    assert analyzer.analysis is None, "an lrpc-compiled file must not be compiled again"
    assert analyzer.model.SerializeToString() == onnx.load(compiled_path).SerializeToString()
    assert analyzer.input_name == "input"
    x = batch(analyzer.model, 3)
    np.testing.assert_allclose(analyzer.analyze(x).val, relevance_of(compiled("small_cnn_softmax"), x), rtol=1e-6)


def test_explanation_fields(analyzer):
    x = batch(analyzer.model, 3)
    expl = analyzer.analyze(x)
    expected = run(original("small_cnn_softmax"), {"input": x})["probabilities"]
    assert isinstance(expl, lrpc.Explanation)
    assert expl.val.shape == x.shape and expl.val.dtype == np.float32
    np.testing.assert_allclose(expl.output, expected, rtol=1e-6, atol=1e-7)  # softmax included
    assert np.asarray(expl.output_selection).tolist() == expected.argmax(1).tolist()
    assert expl.analyzer == "LRP"
    assert expl.heatmap == "attribution"
    assert isinstance(expl.extras, dict) and expl.extras == {}


@pytest.mark.parametrize(
    "selection, expected",
    [(4, [4, 4, 4]), ([1, 2, 3], [1, 2, 3]), (np.array([9, 0, 5]), [9, 0, 5])],
    ids=["int", "list", "array"],
)
def test_output_selection_int_or_one_per_sample(analyzer, selection, expected):
    x = batch(analyzer.model, 3)
    expl = analyzer.analyze(x, selection)
    assert np.asarray(expl.output_selection).tolist() == expected
    np.testing.assert_allclose(expl.val, relevance_of(analyzer.model, x, expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "selection", [10, 99, [1, 2], [0, 1, 2, 3], [0, 10, 1], 1.5],
    ids=["10", "99", "too-short", "too-long", "one-out-of-range", "float"],
)
def test_bad_output_selection_raises_target_error(analyzer, selection):
    with pytest.raises(lrpc.TargetError):
        analyzer.analyze(batch(analyzer.model, 3), selection)


def test_a_negative_selection_means_the_arg_max(analyzer):
    """As in the file's contract: -1 (any negative entry) explains the prediction."""
    x = batch(analyzer.model, 3)
    plain = analyzer.analyze(x)
    mixed = analyzer.analyze(x, [-5, int(plain.output_selection[1]), -1])
    np.testing.assert_array_equal(mixed.output_selection, plain.output_selection)
    np.testing.assert_allclose(mixed.val, plain.val, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "shape", [(3, 8, 8), (2, 3, 8, 7), (2, 2, 8, 8), (2, 3, 16, 16), (2, 1, 3, 8, 8)],
    ids=["no-batch-axis", "width", "channels", "size", "rank-5"],
)
def test_input_of_the_wrong_shape_raises_input_error(analyzer, shape):
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(lrpc.InputError) as info:
        analyzer.analyze(x)
    message = str(info.value)
    assert str(shape) in message, f"the message should show the shape given: {message}"
    assert "3, 8, 8" in message, f"the message should show the shape expected: {message}"


def test_input_that_is_not_numeric_raises_input_error(analyzer):
    with pytest.raises(lrpc.InputError):
        analyzer.analyze("not an image")


def test_empty_batch_raises_input_error(analyzer):
    with pytest.raises(lrpc.InputError):
        analyzer.analyze(np.zeros((0, 3, 8, 8), dtype=np.float32))


def test_compile_options_cannot_be_applied_to_a_compiled_file():
    compiled = lrpc.compile(small_cnn())
    for kwargs in ({"composite": lrpc.EpsilonPlus()}, {"normalize_output_relevance": False}):
        with pytest.raises(lrpc.LrpcError, match="already compiled"):
            lrpc.LRP(compiled, **kwargs)
