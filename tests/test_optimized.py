"""Models as onnxruntime optimizes them: the transformer optimizer's files (fused
``Attention``, ``MultiHeadAttention``, ``EmbedLayerNormalization``, ``SkipLayerNormalization``,
``SkipSimplifiedLayerNormalization``, ``SimplifiedLayerNormalization``, ``BiasGelu``,
``FastGelu``, ``QuickGelu``) and files saved by onnxruntime's graph optimizer at the extended
level (``FusedConv``, ``FusedGemm``, ``FusedMatMul``), made with onnxruntime's own tools
from the tiny random-weight models the other tests export.

Same weights, same relevance: each optimized file's relevance equals the relevance of the
exporter's file it was made from (whose relevance the transformer and Zennit tests check
against independent references) within 1e-4 relative, and its outputs are the optimized
file's own, bit for bit (the compiled file runs the fused kernels)."""

from __future__ import annotations

import collections
import functools
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from support import transformer_zoo as tz
from support import zoo
from support.export import export_onnx
from support.runtimes import onnxruntime_run as _run, relative_error as _relative

EPSILON = 1e-9
TOLERANCE = 1e-4
#: model → the optimizer's model_type (LLaMA's fusions are the BERT optimizer's norms)
MODEL_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "albert": "bert", "vit": "vit",
               "gpt2": "gpt2", "llama": "bert"}
#: fusion option variants: the raw 2-D mask and MultiHeadAttention instead of Attention
VARIANTS = {"default": {}, "raw-mask": {"use_raw_attention_mask": True}, "mha": {"use_multi_head_attention": True}}
#: the fused ops each model's optimized file must hold (so a test cannot pass on an unfused file)
EXPECTED = {
    ("bert", "default"): {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"},
    ("bert", "raw-mask"): {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization"},
    ("bert", "mha"): {"EmbedLayerNormalization", "MultiHeadAttention", "SkipLayerNormalization"},
    ("distilbert", "default"): {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"},
    ("roberta", "mha"): {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"},
    ("roberta", "default"): {"Attention", "SkipLayerNormalization", "BiasGelu"},
    ("albert", "default"): {"Attention", "SkipLayerNormalization", "FastGelu"},
    ("vit", "default"): {"SkipLayerNormalization", "BiasGelu"},
    ("gpt2", "default"): {"SkipLayerNormalization", "FastGelu"},
    ("llama", "default"): {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"},
}
#: where level 2 (onnxruntime's own fusions, after shape inference failed on the SkipSimplified
#: pattern) makes other ops: LLaMA's SiLU becomes QuickGelu, its residual norms stay plain
EXPECTED_AT_LEVEL_2 = {("llama", "default"): {"SimplifiedLayerNormalization", "QuickGelu"}}
CASES = [(name, variant, level) for name, variant in EXPECTED for level in (1, 2)
         if level == 1 or variant == "default"]


@functools.lru_cache(maxsize=None)
def optimized(name: str, variant: str, level: int, opset: int | None = None) -> bytes:
    """The transformer optimizer's file (``opt_level`` 1: its own fusions; 2: onnxruntime's
    extended graph optimizations on top, saved) of the export at ``opset``."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(MODEL_TYPES[name])
    for key, value in VARIANTS[variant].items():
        if key == "use_raw_attention_mask":
            options.use_raw_attention_mask(value)
        else:
            setattr(options, key, value)
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(directory, "model.onnx")
        with open(path, "wb") as handle:
            handle.write(tz.export_bytes(name, opset=opset))
        model = optimize_model(path, model_type=MODEL_TYPES[name], num_heads=4, hidden_size=tz.HIDDEN,
                               opt_level=level, optimization_options=options, verbose=False)
        return model.model.SerializeToString()


def _fused_ops(data: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(data).graph.node
            if n.domain == "com.microsoft" or n.op_type.startswith("Simplified")}


def _relevance(model: bytes, preset: str, feeds: dict) -> tuple:
    compiled = lrpc.compile(model, getattr(lrpc, preset)(epsilon=EPSILON), normalize_output_relevance=False,
                            verbose=False)
    return _run(compiled, feeds)


@pytest.mark.parametrize("preset", ["AttnLRP", "CPLRP"])
@pytest.mark.parametrize("name, variant, level", CASES)
def test_optimized_transformer_has_the_exported_files_relevance(name, variant, level, preset):
    data = optimized(name, variant, level)
    expected = EXPECTED_AT_LEVEL_2.get((name, variant), EXPECTED[(name, variant)]) if level == 2 else \
        EXPECTED[(name, variant)]
    assert expected <= _fused_ops(data)
    feeds = tz.example(name, 3).feeds()  # BERT-like: the last sample padded
    logits, relevance = _relevance(data, preset, feeds)
    assert np.array_equal(logits, _run(data, feeds)[0])  # the fused kernels' own outputs
    want_logits, want = _relevance(tz.export_bytes(name), preset, feeds)
    assert _relative(logits, want_logits) < 1e-5
    assert relevance.shape == want.shape and np.abs(want).max() > 0
    assert _relative(relevance, want) < TOLERANCE


# -- onnxruntime's graph optimizer, saved: FusedConv, FusedGemm ------------------------------------


def _saved_by_onnxruntime(data: bytes) -> bytes:
    """The file onnxruntime writes with ``optimized_model_filepath`` at the extended level
    (Conv + activation → ``FusedConv``, Gemm + activation → ``FusedGemm``)."""
    with tempfile.TemporaryDirectory() as directory:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        with open(options.optimized_model_filepath, "rb") as handle:
            return handle.read()


@functools.lru_cache(maxsize=None)
def _cnn_forms(name: str) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(zoo.build(name, 0), zoo.example_input(name, 2, 0), os.path.join(directory, "m.onnx"),
                           dynamo=False)
        with open(path, "rb") as handle:
            plain = handle.read()
    return plain, _saved_by_onnxruntime(plain)


@pytest.mark.parametrize("name", ["lenet", "resnet"])
@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonAlpha2Beta1Flat"])
def test_cnn_saved_by_onnxruntimes_optimizer_has_the_exported_files_relevance(name, composite):
    plain, fused = _cnn_forms(name)
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(fused).graph.node if n.domain)
    assert ops["FusedConv"] > 0
    x = zoo.example_input(name, 3, 1)
    feeds = {onnx.load_from_string(plain).graph.input[0].name: x}
    got = _run(lrpc.compile(fused, getattr(lrpc, composite)(), normalize_output_relevance=False, verbose=False),
               feeds)
    want = _run(lrpc.compile(plain, getattr(lrpc, composite)(), normalize_output_relevance=False, verbose=False),
                feeds)
    assert np.array_equal(got[0], _run(fused, feeds)[0])
    assert _relative(got[1], want[1]) < TOLERANCE and np.abs(want[1]).max() > 0


# -- opset 23's attention ops: torch's dynamo exporter writes Attention, RotaryEmbedding, RMSNormalization --


#: LLaMA's file runs at batch 1 only: onnxruntime's RotaryEmbedding kernel wants the cos cache
#: torch exports ([1, S, h/2]) at the input's batch size
OPSET_23 = {"bert": 3, "vit": 3, "gpt2": 3, "llama": 1}


@pytest.mark.parametrize("preset", ["AttnLRP", "CPLRP"])
@pytest.mark.parametrize("name", sorted(OPSET_23))
def test_opset_23_attention_export_has_the_exported_files_relevance(name, preset):
    data = tz.export_bytes(name, attn="sdpa", exporter="dynamo", opset=23)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "Attention" in ops and (name != "llama" or {"RotaryEmbedding", "RMSNormalization"} <= ops)
    feeds = tz.example(name, OPSET_23[name]).feeds()
    logits, relevance = _relevance(data, preset, feeds)
    assert np.array_equal(logits, _run(data, feeds)[0])
    want_logits, want = _relevance(tz.export_bytes(name), preset, feeds)
    assert _relative(logits, want_logits) < 1e-5
    assert relevance.shape == want.shape and np.abs(want).max() > 0
    assert _relative(relevance, want) < TOLERANCE


def test_optimized_float16_transformer_is_near_the_float_exports_relevance():
    """The optimizer's float16 conversion (``convert_float_to_float16``, float32 I/O) of the
    fused BERT: fused kernels in float16 for the outputs, the twin in float32 with the
    rounded weights; 1e-2 of the float32 export (measured 1.2e-3: the weights' rounding)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load_from_string(optimized("bert", "default", 1)))
    model.convert_float_to_float16(keep_io_types=True)
    data = model.model.SerializeToString()
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.model.graph.initializer)
    feeds = tz.example("bert", 3).feeds()
    logits, relevance = _relevance(data, "AttnLRP", feeds)
    assert np.array_equal(logits, _run(data, feeds)[0])
    _, want = _relevance(tz.export_bytes("bert"), "AttnLRP", feeds)
    assert relevance.dtype == np.float32 and _relative(relevance, want) < 1e-2


def test_optimized_transformer_below_opset_17_runs_converted_and_has_the_exports_relevance():
    """Exported at opset 14 (LayerNorm written out, fused by the optimizer into
    SkipLayerNormalization): the compiled file's forward is converted to opset 17, so its
    outputs are within float rounding of the file's (measured 7.9e-7), not bit-identical."""
    data = optimized("bert", "default", 1, opset=14)
    assert onnx.load_from_string(data).opset_import[0].version == 14
    assert EXPECTED[("bert", "default")] <= _fused_ops(data)
    feeds = tz.example("bert", 3).feeds()
    logits, relevance = _relevance(data, "AttnLRP", feeds)
    assert _relative(logits, _run(data, feeds)[0]) < 1e-5
    _, want = _relevance(tz.export_bytes("bert", opset=14), "AttnLRP", feeds)
    assert _relative(relevance, want) < TOLERANCE
