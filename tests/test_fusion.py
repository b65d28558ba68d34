"""Exporter patterns fused into one op (a test per pattern), affine folding, inlining.

Each pattern sits between two dense layers. After canonizing, the layer list shows one
activation (or normalization) instead of the primitive ops; the compiled file still
computes the original forward pass with standard ops only, and relevance passes the
fused activation unchanged, as through any activation.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

import lrpc
from lrpc.compiler import analyze_model
from lrpc.graph import FUSED_DOMAIN
from support.cases import build, check_chain, rand, t

W1, W2 = rand(6, 5), rand(5, 3)


def c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


B1 = rand(5)


def between_dense(pattern_nodes, constants, out="a", bias=False):
    """``x · W1 (+ b1) -> pattern -> · W2``; with ``bias`` the pattern's input is the bias
    ``Add`` (its operand sums must not reach into it)."""
    first = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"])] if bias \
        else [helper.make_node("MatMul", ["x", "w1"], ["h"])]
    nodes = [*first, *pattern_nodes, helper.make_node("MatMul", [out, "w2"], ["logits"])]
    model = build(nodes, {"w1": W1, "w2": W2, **({"b1": B1} if bias else {})}, (4, 6))
    model.graph.initializer.extend(constants)
    return model


PATTERNS = {
    "hardswish_clip": (
        [helper.make_node("Add", ["h", "three"], ["h3"]), helper.make_node("Clip", ["h3", "zero", "six"], ["r6"]),
         helper.make_node("Mul", ["h", "r6"], ["m"]), helper.make_node("Div", ["m", "six"], ["a"])],
        [c("three", 3.0), c("zero", 0.0), c("six", 6.0)], "HardSwish",
        lambda h: h * torch.clamp(h + 3, 0, 6) / 6,
    ),
    "hardswish_hardsigmoid": (
        [helper.make_node("HardSigmoid", ["h"], ["hs"], alpha=1 / 6, beta=0.5), helper.make_node("Mul", ["hs", "h"], ["a"])],
        [], "HardSwish", lambda h: h * torch.clamp(h / 6 + 0.5, 0, 1),
    ),
    "silu": (
        [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["a"])],
        [], "SiLU", lambda h: h * torch.sigmoid(h),
    ),
    "gelu_erf": (
        [helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
         helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["m"]),
         helper.make_node("Mul", ["m", "half"], ["a"])],
        [c("sqrt2", math.sqrt(2)), c("one", 1.0), c("half", 0.5)], "Gelu",
        lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    ),
    "gelu_tanh": (
        [helper.make_node("Pow", ["h", "three"], ["p"]), helper.make_node("Mul", ["k", "p"], ["kp"]),
         helper.make_node("Add", ["h", "kp"], ["inner"]), helper.make_node("Mul", ["inner", "s2pi"], ["scaled"]),
         helper.make_node("Tanh", ["scaled"], ["th"]), helper.make_node("Add", ["one", "th"], ["t1"]),
         helper.make_node("Mul", ["half", "h"], ["hh"]), helper.make_node("Mul", ["hh", "t1"], ["a"])],
        [c("three", 3.0), c("k", 0.044715), c("s2pi", math.sqrt(2 / math.pi)), c("one", 1.0), c("half", 0.5)],
        "Gelu", lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    ),
    # spellings the literal patterns do not know, recognized by value (lrpc/passes/activations.py)
    "gelu_half_folded_away": (  # onnxsim moves the ½ into the next layer's weights
        [helper.make_node("Mul", ["h", "inv_sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
         helper.make_node("Add", ["one", "e"], ["e1"]), helper.make_node("Mul", ["e1", "h"], ["a"])],
        [c("inv_sqrt2", 1 / math.sqrt(2)), c("one", 1.0)], "Gelu",
        lambda h: h * (1 + torch.erf(h / math.sqrt(2))),
    ),
    "gelu_half_first": (
        [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Div", ["h", "sqrt2"], ["d"]),
         helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"]),
         helper.make_node("Mul", ["hh", "e1"], ["a"])],
        [c("half", 0.5), c("sqrt2", 1.4142135), c("one", 1.0)], "Gelu",
        lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    ),
    "gelu_tanh_constants_folded": (  # tanh(√(2/π)·x + √(2/π)·0.044715·x³), x·x·x
        [helper.make_node("Mul", ["h", "h"], ["h2"]), helper.make_node("Mul", ["h2", "h"], ["h3"]),
         helper.make_node("Mul", ["h3", "k"], ["kh3"]), helper.make_node("Mul", ["h", "s2pi"], ["sh"]),
         helper.make_node("Add", ["sh", "kh3"], ["inner"]), helper.make_node("Tanh", ["inner"], ["th"]),
         helper.make_node("Add", ["th", "one"], ["t1"]), helper.make_node("Mul", ["t1", "h"], ["ht"]),
         helper.make_node("Mul", ["ht", "half"], ["a"])],
        [c("k", math.sqrt(2 / math.pi) * 0.044715), c("s2pi", math.sqrt(2 / math.pi)), c("one", 1.0),
         c("half", 0.5)], "Gelu",
        lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    ),
    "silu_scaled": (
        [helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "two"], ["h2"]),
         helper.make_node("Mul", ["h2", "s"], ["a"])],
        [c("two", 2.0)], "SiLU", lambda h: 2 * h * torch.sigmoid(h),
    ),
    "hardswish_relu6_divided": (
        [helper.make_node("Add", ["h", "three"], ["h3"]), helper.make_node("Relu", ["h3"], ["r"]),
         helper.make_node("Clip", ["r", "", "six"], ["r6"]), helper.make_node("Div", ["r6", "six"], ["g"]),
         helper.make_node("Mul", ["g", "h"], ["a"])],
        [c("three", 3.0), c("six", 6.0)], "HardSwish", lambda h: h * torch.clamp(h + 3, 0, 6) / 6,
    ),
    "mish": (
        [helper.make_node("Softplus", ["h"], ["sp"]), helper.make_node("Tanh", ["sp"], ["th"]),
         helper.make_node("Mul", ["h", "th"], ["a"])],
        [], "Mish", lambda h: h * torch.tanh(F.softplus(h)),
    ),
}


@pytest.mark.parametrize("bias", [False, True], ids=["", "after-bias"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_activation_patterns_are_fused(name, bias):
    """Also right after a layer's bias ``Add`` (ALBERT's tanh GELU was missed there: the sum
    inside the pattern took the bias ``Add`` for one of its own terms)."""
    nodes, constants, op, fn = PATTERNS[name]
    model = between_dense(nodes, constants, bias=bias)
    analysis = analyze_model(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-6))))
    fused = [n for n in analysis.program.graph.nodes if n.domain == FUSED_DOMAIN]
    assert [n.op for n in fused] == [op]
    assert [row.op_type for row in analysis.report.rows][-2:] == [op, "MatMul"]
    # relevance passes the activation unchanged; the forward pass is the original one
    x = rand(4, 6)
    first = (lambda x: x @ t(W1) + t(B1)) if bias else (lambda x: x @ t(W1))
    check_chain(model, x, [(first, "eps"), (fn, "pass"), (lambda a: a @ t(W2), "eps")])
    # the compiled file has the pattern's own nodes back (check_chain compared its outputs)
    compiled = lrpc.compile(model)
    assert all(n.domain in ("", "ai.onnx") for n in compiled.graph.node)
    forward = [n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")]
    assert op not in forward and {n.op_type for n in nodes} - {"Div"} <= set(forward)


def test_a_pattern_whose_inside_is_used_elsewhere_is_not_fused():
    nodes, constants, _, _ = PATTERNS["silu"]
    model = between_dense(nodes + [helper.make_node("Add", ["a", "s"], ["a2"])], constants, out="a2")
    analysis = analyze_model(model, skip_checks=True)
    assert not [n for n in analysis.program.graph.nodes if n.domain == FUSED_DOMAIN]


@pytest.mark.parametrize("name, constants", [
    ("gelu_erf", [c("sqrt2", 2.0), c("one", 1.0), c("half", 0.5)]),  # erf(x/2): not a GELU
    ("gelu_half_folded_away", [c("inv_sqrt2", 1.0), c("one", 1.0)]),  # x(1 + erf(x))
    ("gelu_tanh_constants_folded", [c("k", 0.1), c("s2pi", math.sqrt(2 / math.pi)), c("one", 1.0),
                                    c("half", 0.5)]),
])
def test_gelu_with_other_constants_is_not_gelu(name, constants):
    nodes, _, _, _ = PATTERNS[name]
    analysis = analyze_model(between_dense(nodes, constants), skip_checks=True)
    assert not {"Gelu", "SiLU", "Mish", "HardSwish"} & {n.op for n in analysis.program.graph.nodes}


def _held(h, centre: bool, eps: float = 1e-5):
    """LayerNorm (``centre``) or RMSNorm with the statistic detached: LRP's linearization."""
    d = h - h.mean(-1, keepdim=True) if centre else h
    return d / torch.sqrt((d**2).mean(-1, keepdim=True) + eps).detach()


NORM_PATTERNS = {
    "LayerNormalization": ([
        helper.make_node("ReduceMean", ["h", "axes"], ["mu"]),
        helper.make_node("Sub", ["h", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["a"], name="/encoder/norm/Div"),
    ], True),
    # LLaMA's RMSNorm as the legacy exporter writes it: x * (1 / sqrt(mean(x²) + eps))
    "RMSNormalization": ([
        helper.make_node("Pow", ["h", "two"], ["h2"]),
        helper.make_node("ReduceMean", ["h2", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["one", "rms"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["a"], name="/encoder/norm/Mul"),
    ], False),
}


@pytest.mark.parametrize("op", sorted(NORM_PATTERNS))
def test_normalization_patterns_are_fused_and_hold_their_statistic(op):
    nodes, centre = NORM_PATTERNS[op]
    constants = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"), c("two", 2.0), c("eps", 1e-5),
                 c("one", 1.0)]
    model = between_dense(nodes, constants)
    model.opset_import[0].version = 18  # ReduceMean takes axes as an input
    rules = lrpc.lrp_rules(model, lrpc.EpsilonPlus())
    assert [(layer.name, layer.op_type) for layer, _ in rules][1] == (f"/encoder/norm/{op}", op)
    assert repr(rules[1][1]) == "LayerNormRule(epsilon=1e-06)"
    # relevance: the ε-rule through the map with σ (rms) held at its forward value
    x = rand(4, 6)
    check_chain(model, x, [(lambda x: x @ t(W1), "eps"), (lambda h: _held(h, centre), "eps"),
                           (lambda a: a @ t(W2), "eps")])
    # the file keeps the original ops
    compiled = lrpc.compile(model)
    assert "Sqrt" in {n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")}
    assert op not in {n.op_type for n in compiled.graph.node}


# -- per-channel affine after Conv / BatchNorm ---------------------------------------------


def test_affine_after_batchnorm_and_conv_folds_away():
    """Conv -> BatchNormalization (no affine) -> Mul(gamma) -> Add(beta): one Conv."""
    w, b = rand(4, 3, 3, 3), rand(4)
    mean, var = rand(4), rand(4, positive=True)
    gamma, beta = rand(4, 1, 1), rand(4, 1, 1)
    scale2, shift2 = rand(1, 4, 1, 1), rand(4, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "ones", "zeros", "mean", "var"], ["n"]),
        helper.make_node("Unsqueeze", ["g1", "ax"], ["g"]),
        helper.make_node("Mul", ["n", "g"], ["nm"]),
        helper.make_node("Add", ["nm", "beta"], ["y"]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c2"]),
        helper.make_node("Mul", ["c2", "scale2"], ["c2m"]),
        helper.make_node("Add", ["shift2", "c2m"], ["c2a"]),
        helper.make_node("Flatten", ["c2a"], ["logits"]),
    ]
    inits = {"w": w, "b": b, "ones": np.ones(4, np.float32), "zeros": np.zeros(4, np.float32), "mean": mean,
             "var": var, "g1": gamma.reshape(4, 1), "ax": np.array([2], dtype=np.int64), "beta": beta,
             "w2": rand(4, 4, 1, 1), "scale2": scale2, "shift2": shift2}
    model = build(nodes, inits, (2, 3, 4, 4))
    analysis = analyze_model(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule())))
    assert [layer.op_type for layer in analysis.table.layers] == ["Conv", "Conv", "Flatten"]
    x = rand(2, 3, 4, 4)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    folded = ort.InferenceSession(analysis.program.to_model().SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(folded, original, rtol=1e-4, atol=1e-5)


# -- model-local functions ---------------------------------------------------------------


def test_model_local_functions_are_inlined():
    body = [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])]
    function = onnx.helper.make_function("custom", "DenseRelu", ["X", "W"], ["Y"], body,
                                         [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("DenseRelu", ["x", "w1"], ["a"], domain="custom"),
             helper.make_node("MatMul", ["a", "w2"], ["logits"])]
    model = build(nodes, {"w1": W1, "w2": W2}, (4, 6))
    model.opset_import.append(helper.make_opsetid("custom", 1))
    model.functions.append(function)
    layers = [layer.op_type for layer, _ in lrpc.lrp_rules(model, lrpc.Composite())]
    assert layers == ["MatMul", "MatMul"]
    check_chain(model, rand(4, 6), [(lambda x: torch.relu(x @ t(W1)), "eps"), (lambda a: a @ t(W2), "eps")])


# -- external data -------------------------------------------------------------------------


def test_external_data_in_and_out(tmp_path):
    model = between_dense([helper.make_node("Relu", ["h"], ["a"])], [])
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="model.weights", size_threshold=0)
    assert (tmp_path / "in" / "model.weights").exists()
    dst = tmp_path / "out" / "model.lrp.onnx"
    lrpc.compile_file(src, dst, external_data=True)
    # these weights are below 1 KiB: they stay inline (tests/test_files.py has large ones)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.lrp.onnx"]
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    x = rand(4, 6)
    logits, relevance = sess.run(None, {"x": x})
    np.testing.assert_allclose(logits, np.maximum(x @ W1, 0) @ W2, rtol=1e-4, atol=1e-5)
    assert relevance.shape == x.shape



def test_local_response_norm_pattern_is_fused():
    """torch's LocalResponseNorm as the dynamo exporter writes it: x / (k + α·avg(x²))^β."""
    w = rand(54, 4)
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Unsqueeze", ["sq", "ax1"], ["sq5"]),
        helper.make_node("Pad", ["sq5", "pads"], ["padded"]),
        helper.make_node("AveragePool", ["padded"], ["avg5"], kernel_shape=[5, 1, 1]),
        helper.make_node("Squeeze", ["avg5", "ax1"], ["avg"]),
        helper.make_node("Mul", ["avg", "alpha"], ["scaled"]),
        helper.make_node("Add", ["scaled", "k"], ["base"]),
        helper.make_node("Pow", ["base", "beta"], ["den"]),
        helper.make_node("Div", ["x", "den"], ["y"], name="/features/lrn/Div"),
        helper.make_node("Flatten", ["y"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["logits"]),
    ]
    inits = {"ax1": np.array([1], dtype=np.int64), "pads": np.array([0, 0, 2, 0, 0, 0, 0, 2, 0, 0], dtype=np.int64),
             "alpha": np.array(1e-2, np.float32), "k": np.array(2.0, np.float32), "beta": np.array(0.75, np.float32),
             "w": w}
    model = build(nodes, inits, (2, 6, 3, 3))
    layers = [(layer.op_type, layer.name) for layer, _ in lrpc.lrp_rules(model, lrpc.EpsilonPlus())]
    assert [op for op, _ in layers] == ["LRN", "Flatten", "MatMul"] and layers[0][1] == "/features/lrn/LRN"
    # torch's alpha divides the window sum by the window size, as the average pool does
    lrn = lambda x: torch.nn.functional.local_response_norm(x, 5, alpha=1e-2, beta=0.75, k=2.0)  # noqa: E731
    check_chain(model, rand(2, 6, 3, 3), [(lrn, "pass"), (lambda y: y.reshape(2, -1), "pass"), (lambda f: f @ t(w), "eps")],
                lrpc.EpsilonPlus())


GAMMA, BETA = rand(5, positive=True), rand(5)


def _normalization_between_dense(spelled: bool, kind: str):
    """``x · W1 -> LayerNorm / RMSNorm -> · W2``: the op, or written out in a spelling the
    patterns do not know (``c · c`` for the square, the root as ``Pow(·, ±½)``)."""
    consts = [c("gamma", GAMMA), c("beta", BETA), c("eps", 1e-5), c("half", 0.5), c("minus_half", -0.5),
              numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    if not spelled:
        node = helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["a"], axis=-1, epsilon=1e-5) \
            if kind == "layernorm" else helper.make_node("RMSNormalization", ["h", "gamma"], ["a"], axis=-1,
                                                         epsilon=1e-5)
        nodes = [node]
    elif kind == "layernorm":
        nodes = [helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=1),
                 helper.make_node("Sub", ["h", "m"], ["cen"]), helper.make_node("Mul", ["cen", "cen"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
                 helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Pow", ["ve", "minus_half"], ["inv"]),
                 helper.make_node("Mul", ["cen", "inv"], ["n"]),
                 helper.make_node("Mul", ["n", "gamma"], ["g"]), helper.make_node("Add", ["g", "beta"], ["a"])]
    else:
        nodes = [helper.make_node("Mul", ["h", "h"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                 helper.make_node("Add", ["ms", "eps"], ["me"]), helper.make_node("Pow", ["me", "half"], ["rms"]),
                 helper.make_node("Div", ["h", "rms"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["a"])]
    model = between_dense(nodes, consts)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 23)])
    return model


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_normalization_in_an_unknown_spelling_has_the_ops_relevance(kind):
    """Written out in a spelling no pattern matches, the statistic still is held constant
    (a reciprocal or a divisor of the signal) and the centring is a merge with a mean: the
    relevance is LayerNormRule's on the op itself."""
    x = rand(4, 6)
    got = [lrpc.LRP(_normalization_between_dense(spelled, kind), lrpc.AttnLRP(epsilon=1e-9), verbose=False)
           .analyze(x, [0, 1, 2, 0]) for spelled in (True, False)]
    spelled_ops = {n.op for n in analyze_model(_normalization_between_dense(True, kind)).program.graph.nodes}
    assert not {"LayerNormalization", "RMSNormalization"} & spelled_ops  # not fused: held constant instead
    np.testing.assert_allclose(got[0].output, got[1].output, rtol=1e-5, atol=1e-6)
    assert np.abs(got[0].val - got[1].val).max() <= 1e-4 * np.abs(got[1].val).max()
