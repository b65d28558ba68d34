"""onnxruntime's fused ops written out in standard ops (lrpc/contrib.py): each written-out
form computes what onnxruntime's own kernel computes, on random inputs, for every variant
that is written out; the variants that are not stay fused and the check names them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc import contrib
from lrpc.deployed import analysis_twin, deployed_form
from support.runtimes import onnxruntime_run

MS = "com.microsoft"
B, S, H, N = 2, 5, 8, 2  # batch, sequence, hidden width, heads
rng = np.random.default_rng(0)


def _x(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _model(op: str, inputs: dict, weights: dict, outputs: list[str], domain: str = MS, opset: int = 17,
           shapes: list | None = None, **attrs) -> tuple[onnx.ModelProto, dict]:
    """A one-node model: ``inputs`` are graph inputs (name → array, static shapes; ``None``
    for an absent optional input), ``weights`` initializers; the node's inputs are both, in
    order of the dicts unless keyed ``'3:name'`` (input slot 3). Output ``shapes`` default
    to what onnxruntime's kernel makes."""
    names, graph_inputs, feeds, inits = [], [], {}, []
    for key, value in {**inputs, **weights}.items():
        name = key.split(":")[-1]
        names.append((int(key.split(":")[0]) if ":" in key else len(names), name if value is not None else ""))
        if value is None:
            continue
        if key in inputs:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                              list(value.shape)))
            feeds[name] = value
        else:
            inits.append(numpy_helper.from_array(value, name))
    slots = dict(names)
    ordered = [slots.get(i, "") for i in range(max(slots) + 1)]
    node = helper.make_node(op, ordered, outputs, name="fused", domain=domain, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.INT32 if o == "mask_index" else TensorProto.FLOAT,
                                                             None) for o in outputs if o],
                              inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    if domain not in ("", MS):
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    try:  # the outputs' shapes, as the kernel makes them (the checker wants them declared)
        shapes = shapes or [r.shape for r in _run(model, feeds)]
    except ort.capi.onnxruntime_pybind11_state.NotImplemented:  # no CPU kernel: shaped as the input
        shapes = [next(iter(inputs.values())).shape] * len(graph.output)
    for vi, shape in zip(model.graph.output, shapes):
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(shape)))
    return model, feeds


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    return onnxruntime_run(model, feeds, optimized=False)  # the kernels as written, unfused


def _written_out(model: onnx.ModelProto) -> onnx.ModelProto:
    twin = analysis_twin(model)
    kept = [n for n in twin.graph.node if n.domain == MS or n.op_type == model.graph.node[0].op_type
            or any(a.name == contrib.WHY_FUSED for a in n.attribute)]
    assert not kept, f"{kept[0].op_type} stayed fused"
    return twin


def _mask(lengths, total=S, dtype=np.int32):
    return (np.arange(total)[None, :] < np.asarray(lengths)[:, None]).astype(dtype)


def _qkv(width=H, sizes=None):
    sizes = sizes or [width] * 3
    return {"weights": _x(H, sum(sizes)) * 0.5, "bias": _x(sum(sizes)) * 0.5}


CASES = {
    "SkipLayerNormalization": lambda: _model(
        "SkipLayerNormalization", {"input": _x(B, S, H), "skip": _x(B, S, H)},
        {"gamma": _x(H), "beta": _x(H), "bias": _x(H)}, ["y", "", "", "sum"], epsilon=1e-5),
    "SkipLayerNormalization-plain": lambda: _model(
        "SkipLayerNormalization", {"input": _x(B, S, H), "skip": _x(B, S, H)}, {"gamma": _x(H)}, ["y"]),
    "SkipSimplifiedLayerNormalization": lambda: _model(
        "SkipSimplifiedLayerNormalization", {"input": _x(B, S, H), "skip": _x(B, S, H)},
        {"gamma": _x(H), "bias": _x(H)}, ["y", "", "", "sum"], epsilon=1e-6),
    "SimplifiedLayerNormalization": lambda: _model(
        "SimplifiedLayerNormalization", {"x": _x(B, S, H)}, {"scale": _x(H)}, ["y"], domain="", epsilon=1e-6),
    "LayerNormalization-opset14": lambda: _model(
        "LayerNormalization", {"x": _x(B, S, H)}, {"scale": _x(H), "bias": _x(H)}, ["y"], domain="", opset=14,
        epsilon=1e-5),
    "EmbedLayerNormalization": lambda: _model(
        "EmbedLayerNormalization",
        {"ids": rng.integers(0, 20, (B, S)).astype(np.int32), "segments": rng.integers(0, 2, (B, S)).astype(np.int32),
         "7:mask": _mask([S, 3])},
        {"2:word": _x(20, H), "3:position": _x(16, H), "4:segment": _x(2, H), "5:gamma": _x(H), "6:beta": _x(H)},
        ["y", "mask_index", "sum"], epsilon=1e-12),
    "EmbedLayerNormalization-positions": lambda: _model(
        "EmbedLayerNormalization",
        {"ids": rng.integers(0, 20, (B, S)).astype(np.int32), "1:segments": None,
         "8:positions": rng.integers(0, 16, (B, S)).astype(np.int32)},
        {"2:word": _x(20, H), "3:position": _x(16, H), "4:segment": None, "5:gamma": _x(H), "6:beta": _x(H),
         "7:mask": None}, ["y", "mask_index"]),
    "BiasGelu": lambda: _model("BiasGelu", {"x": _x(B, S, H)}, {"bias": _x(H)}, ["y"]),
    "FastGelu": lambda: _model("FastGelu", {"x": _x(B, S, H) * 2}, {"bias": _x(H)}, ["y"]),
    "FastGelu-no-bias": lambda: _model("FastGelu", {"x": _x(B, S, H) * 2}, {}, ["y"]),
    "Gelu": lambda: _model("Gelu", {"x": _x(B, S, H) * 2}, {}, ["y"]),
    "QuickGelu": lambda: _model("QuickGelu", {"x": _x(B, S, H) * 2}, {}, ["y"], alpha=1.702),
    "QuickGelu-silu": lambda: _model("QuickGelu", {"x": _x(B, S, H) * 2}, {}, ["y"], alpha=1.0),
    "BiasAdd": lambda: _model("BiasAdd", {"x": _x(B, S, H), "2:skip": _x(B, S, H)}, {"1:bias": _x(H)}, ["y"]),
    "BiasSplitGelu": lambda: _model("BiasSplitGelu", {"x": _x(B, S, 2 * H)}, {"bias": _x(2 * H)}, ["y"]),
    **{f"FusedConv-{act or 'none'}": (lambda act=act, params=params: _model(
        "FusedConv", {"x": _x(B, 3, 6, 6)}, {"w": _x(4, 3, 3, 3), "b": _x(4)}, ["y"], pads=[1, 1, 1, 1],
        **({"activation": act} if act else {}), **({"activation_params": params} if params else {})))
       for act, params in [("Relu", None), ("LeakyRelu", [0.2]), ("Tanh", None), ("Sigmoid", None),
                           ("Clip", [0.0, 6.0]), ("HardSigmoid", [0.3, 0.4]), ("", None)]},
    "FusedConv-sum": lambda: _model(
        "FusedConv", {"x": _x(B, 3, 6, 6), "3:z": _x(B, 4, 6, 6)}, {"1:w": _x(4, 3, 3, 3), "2:b": _x(4)}, ["y"],
        pads=[1, 1, 1, 1], activation="Relu"),
    "FusedGemm": lambda: _model("FusedGemm", {"a": _x(B, H)}, {"b": _x(6, H), "c": _x(6)}, ["y"], transB=1,
                                alpha=0.7, activation="LeakyRelu", activation_alpha=0.1),
    "FusedMatMul": lambda: _model("FusedMatMul", {"a": _x(B, H, S)}, {"b": _x(6, H)}, ["y"], transA=1, transB=1,
                                  alpha=0.5),
    "FusedMatMul-activations": lambda: _model("FusedMatMul", {"a": _x(B, S, H), "b": _x(B, S, H)}, {}, ["y"],
                                              transB=1, alpha=0.25),
    "Attention-mask-index": lambda: _model(
        "Attention", {"x": _x(B, S, H), "3:mask": np.array([S, 3], np.int32)}, {"1:weights": _qkv()["weights"],
                                                                               "2:bias": _qkv()["bias"]},
        ["y"], num_heads=N),
    "Attention-raw-mask": lambda: _model(
        "Attention", {"x": _x(B, S, H), "3:mask": _mask([4, 2])}, {"1:weights": _qkv()["weights"],
                                                                  "2:bias": _qkv()["bias"]}, ["y"], num_heads=N),
    "Attention-3d-mask-causal": lambda: _model(
        "Attention", {"x": _x(B, S, H), "3:mask": np.tile(_mask([S, 4])[:, None, :], (1, S, 1))},
        {"1:weights": _qkv()["weights"], "2:bias": _qkv()["bias"]}, ["y"], num_heads=N, unidirectional=1),
    "Attention-sizes-scale-bias": lambda: _model(
        "Attention", {"x": _x(B, S, H), "3:mask": None, "5:attention_bias": _x(1, N, S, S)},
        {"1:weights": _qkv()["weights"], "2:bias": _qkv()["bias"]}, ["y"],
        num_heads=N, qkv_hidden_sizes=[H, H, H], scale=0.3),
    "MultiHeadAttention": lambda: _model(
        "MultiHeadAttention", {"q": _x(B, S, H), "k": _x(B, S + 1, H), "v": _x(B, S + 1, H),
                               "4:key_padding_mask": _mask([S + 1, 2], S + 1)},
        {"3:bias": _x(3 * H)}, ["y"], num_heads=N),
    "MultiHeadAttention-past": lambda: _model(
        "MultiHeadAttention", {"q": _x(B, S, H), "k": _x(B, S, H), "v": _x(B, S, H), "3:bias": None,
                               "4:key_padding_mask": None, "5:attention_bias": _x(1, N, S, S + 3),
                               "6:past_key": _x(B, N, 3, H // N), "7:past_value": _x(B, N, 3, H // N)},
        {}, ["y", "present_key", "present_value"], num_heads=N, unidirectional=1),
    # opset 23's standard ops, written out the same way
    "Attention-23-4d-bool-mask": lambda: _model(
        "Attention", {"q": _x(B, N, S, 4), "k": _x(B, N, S + 1, 4), "v": _x(B, N, S + 1, 4),
                      "mask": np.tile(_mask([S + 1, 3], S + 1, np.bool_)[:, None, None, :], (1, 1, S, 1))}, {}, ["y"], domain="", opset=23),
    "Attention-23-3d-gqa-causal-past": lambda: _model(
        "Attention", {"q": _x(B, S, 4 * 4), "k": _x(B, S, 2 * 4), "v": _x(B, S, 2 * 4), "3:mask": None,
                      "past_key": _x(B, 2, 3, 4), "past_value": _x(B, 2, 3, 4)}, {},
        ["y", "present_key", "present_value"], domain="", opset=23, q_num_heads=4, kv_num_heads=2, is_causal=1),
    "Attention-23-float-mask-softcap-scale": lambda: _model(
        "Attention", {"q": _x(B, N, S, 4) * 3, "k": _x(B, N, S, 4), "v": _x(B, N, S, 4), "mask": _x(S, S)}, {},
        ["y"], domain="", opset=23, softcap=2.0, scale=0.7),
    "RotaryEmbedding-23-4d": lambda: _model(
        "RotaryEmbedding", {"x": _x(B, N, S, 8), "3:positions": rng.integers(0, 16, (B, S)).astype(np.int64)},
        {"1:cos": _x(16, 4), "2:sin": _x(16, 4)}, ["y"], domain="", opset=23),
    "RotaryEmbedding-23-3d-interleaved-partial": lambda: _model(
        "RotaryEmbedding", {"x": _x(B, S, N * 8), "1:cos": _x(B, S, 2), "2:sin": _x(B, S, 2)}, {}, ["y"],
        domain="", opset=23, num_heads=N, interleaved=1, rotary_embedding_dim=4),
    "RotaryEmbedding-contrib": lambda: _model(
        "RotaryEmbedding", {"x": _x(B, S, N * 8), "positions": rng.integers(0, 16, (B, S)).astype(np.int64)},
        {"cos": _x(16, 4), "sin": _x(16, 4)}, ["y"], num_heads=N),
    # onnxruntime-genai's decoder attention; seqlens_k is each row's total length − 1
    "GroupQueryAttention-prompt-rotary": lambda: _gqa(S, past=0, do_rotary=1),
    "GroupQueryAttention-empty-past-packed": lambda: _gqa(S, past=0, packed=True, empty_past=True),
    "GroupQueryAttention-step-after-past": lambda: _gqa(1, past=4, do_rotary=1, rotary_interleaved=1),
    "GroupQueryAttention-chunk-after-past-window-softcap": lambda: _gqa(3, past=4, local_window_size=2, softcap=1.5, batch=1),
    "GroupQueryAttention-bias-scale-mqa": lambda: _gqa(S, past=0, kv_heads=1, bias=True, scale=0.4),
}


def _gqa(queries: int, past: int, kv_heads: int = 2, packed: bool = False, empty_past: bool = False,
         bias: bool = False, batch: int = B, **attrs) -> tuple[onnx.ModelProto, dict]:
    heads, h = 4, 16  # the kernel wants head sizes in multiples of 16 with rotary
    total = past + queries
    q, k, v = (_x(batch, queries, n * h) * c for n, c in ((heads, 2), (kv_heads, 2), (kv_heads, 1)))
    inputs = {"q": np.concatenate([q, k, v], -1), "1:k": None, "2:v": None} if packed else {"q": q, "k": k, "v": v}
    if past or empty_past:
        inputs |= {"3:past_key": _x(batch, kv_heads, past, h), "4:past_value": _x(batch, kv_heads, past, h)}
    inputs |= {"5:seqlens_k": np.full(batch, total - 1, np.int32), "6:total_sequence_length": np.array(total, np.int32)}
    if attrs.get("do_rotary"):
        inputs |= {"7:cos": np.cos(_x(16, h // 2)), "8:sin": np.sin(_x(16, h // 2))}
    if bias:
        inputs |= {"10:attention_bias": _x(1, heads, queries, total)}
    outputs = ["y", "present_key", "present_value"]
    return _model("GroupQueryAttention", inputs, {}, outputs, num_heads=heads, kv_num_heads=kv_heads, **attrs)


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))


#: the definitions of ops onnxruntime has no CPU kernel for (ContribOperators.md)
WITHOUT_CPU_KERNEL = {
    "BiasAdd": lambda f, w: [f["x"] + w["bias"] + f["skip"]],
    "BiasSplitGelu": lambda f, w: [np.split(f["x"] + w["bias"], 2, axis=-1)[0]
                                   * _gelu(np.split(f["x"] + w["bias"], 2, axis=-1)[1])],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_out_form_computes_what_the_kernel_computes(case):
    model, feeds = CASES[case]()
    assert deployed_form(model)["fused"]
    if case in WITHOUT_CPU_KERNEL:
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        want = [w.astype(np.float32) for w in WITHOUT_CPU_KERNEL[case](feeds, weights)]
    else:
        want = _run(model, feeds)
    got = _run(_written_out(model), feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_a_fused_op_without_a_rule_is_named_with_its_domain():
    tokens = 7  # two sequences of 3 and 4 tokens, packed
    model, _ = _model("PackedMultiHeadAttention",
                      {"q": _x(tokens, H), "k": _x(tokens, H), "v": _x(tokens, H), "bias": None,
                       "token_offset": np.arange(B * 4, dtype=np.int32).reshape(B, 4),
                       "cumulative_sequence_length": np.array([0, 3, 7], np.int32)},
                      {}, ["y"], shapes=[(tokens, H)], num_heads=N)
    model.graph.node.insert(0, helper.make_node("Relu", ["x0"], ["q"]))
    model.graph.input[0].name = "x0"
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model, verbose=False)
    reasons = {r.op_type: r.status for r in info.value.report.failures}
    assert reasons["PackedMultiHeadAttention"] == "com.microsoft.PackedMultiHeadAttention: fused op without a rule"


def test_a_variant_not_written_out_stays_fused_and_says_why():
    model, _ = _model("Attention", {"x": _x(B, S, H), "3:mask": np.array([S, 3, 0, 0], np.int32)},
                      {"1:weights": _qkv()["weights"], "2:bias": _qkv()["bias"]}, ["y"], shapes=[(B, S, H)],
                      num_heads=N)
    twin = analysis_twin(model)
    kept = [n for n in twin.graph.node if n.op_type == "Attention"]
    assert len(kept) == 1 and any(a.name == contrib.WHY_FUSED for a in kept[0].attribute)
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model, verbose=False)
    assert [r.status for r in info.value.report.failures] == [
        "com.microsoft.Attention: fused op without a rule (a mask index that is not [batch] end positions)"]


def test_default_domain_runtime_ops_load_and_standard_ops_stay():
    model, _ = CASES["SimplifiedLayerNormalization"]()
    assert lrpc.files.runtime_default_domain_ops(model) == {"SimplifiedLayerNormalization"}
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)  # onnx alone refuses it
    assert lrpc.files.load_model(model) is model
    standard, _ = _model("LayerNormalization", {"x": _x(B, S, H)}, {"scale": _x(H)}, ["y"], domain="")
    assert lrpc.files.runtime_default_domain_ops(standard) == set()
    assert not deployed_form(standard)["fused"]


def test_a_contrib_op_named_like_a_standard_one_is_not_the_standard_op():
    """``com.microsoft.nchwc.Conv`` (files saved at ORT_ENABLE_ALL) computes on a blocked layout."""
    model, _ = _model("Conv", {"x0": _x(B, 8, 6, 6)}, {"w": _x(8, 8, 3, 3)}, ["y"], domain="com.microsoft.nchwc",
                      shapes=[(B, 8, 4, 4)])
    with pytest.raises(lrpc.UnsupportedModelError) as info:
        lrpc.compile(model, verbose=False)
    assert [r.status for r in info.value.report.failures] == ["com.microsoft.nchwc.Conv: fused op without a rule"]
