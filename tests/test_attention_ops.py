"""The ops transformers add, each in a hand-built ONNX graph against a torch reference.

The reference (``support.attnlrp_ref.gradient_relevance``) is Gradient × Input with
AttnLRP's backward passes: products of two activations halve each factor's gradient, the
softmax keeps its Jacobian, LayerNorm's σ is detached; with ε → 0 that is LRP-ε through
every layer. lrpc runs at ε = 1e-9 without output normalization.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support.attnlrp_ref import gradient_relevance
from support.cases import rand, t

EPS = 1e-9


def graph(nodes, inits, x_shape, opset=17, x_type=TensorProto.FLOAT):
    g = helper.make_graph(
        nodes, "case",
        [helper.make_tensor_value_info("x", x_type, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "K"])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


def relevance(model, x, composite=None, target=None):
    composite = composite or lrpc.AttnLRP(EPS)
    compiled = lrpc.compile(model, composite, normalize_output_relevance=False)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x} if target is None else {"x": x, "lrp_target": np.asarray(target, np.int64)}
    logits, r = sess.run(["logits", "relevance"], feeds)
    return logits, r


def check(model, x, fn, target, cp=False, composite=None):
    logits, r = relevance(model, x, composite or (lrpc.CPLRP(EPS) if cp else lrpc.AttnLRP(EPS)), target)
    with torch.no_grad():
        want_logits = fn(t(x)).numpy()
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    want = gradient_relevance(fn, x, target, cp=cp)
    error = np.abs(r - want).max() / np.abs(want).max()
    assert error < 1e-4, f"max|ΔR|/max|R| = {error:.2e}"
    return r


W43, C4 = rand(4, 3), rand(4)


def test_matmul_of_two_activations_shares_relevance_equally():
    """z = x · (x·c)ᵀ over the last two axes of [N, 2, 5, 4] (like Q·Kᵀ)."""
    c = rand(4)
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["k"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["x", "kt"], ["s"]),
        helper.make_node("Flatten", ["s"], ["logits"], axis=1),
    ]
    x = rand(2, 2, 5, 4)
    r = check(graph(nodes, {"c": c}, x.shape), x,
              lambda x: torch.matmul(x, (x * t(c)).transpose(-1, -2)).flatten(1), [3, 17])
    # conservation: a bilinear map without bias passes all of the logit on
    logits = (x @ np.swapaxes(x * c, -1, -2)).reshape(2, -1)
    np.testing.assert_allclose(r.reshape(2, -1).sum(1), logits[[0, 1], [3, 17]], rtol=1e-4)


def test_matmul_with_a_broadcast_factor():
    """[N, 2, 5, 4] · [N, 1, 4, 3]: the second factor's relevance sums over the broadcast heads."""
    nodes = [
        helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["b0"]),           # [N, 1, 5, 4]
        helper.make_node("MatMul", ["b0", "w"], ["b"]),                        # [N, 1, 5, 3]
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 1, 3, 2]),      # [N, 1, 3, 5]
        helper.make_node("MatMul", ["bt", "x"], ["z"]),                        # [N, 2, 3, 4]
        helper.make_node("Flatten", ["z"], ["logits"], axis=1),
    ]
    inits = {"s0": np.array([0], np.int64), "s1": np.array([1], np.int64), "ax": np.array([1], np.int64), "w": W43}
    x = rand(2, 2, 5, 4)
    check(graph(nodes, inits, x.shape), x,
          lambda x: torch.matmul(torch.matmul(x[:, :1], t(W43)).transpose(-1, -2), x).flatten(1), [0, 11])


def test_mul_of_two_activations_and_its_gate_under_cp_lrp():
    """A gated MLP: SiLU(x·Wg) * (x·Wu) · Wd. AttnLRP splits the product 50/50; CP-LRP holds
    the activated factor constant."""
    wg, wu, wd = rand(4, 6), rand(4, 6), rand(6, 3)
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("MatMul", ["x", "wu"], ["u"]),
        helper.make_node("Mul", ["silu", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "wd"], ["logits"]),
    ]
    model = graph(nodes, {"wg": wg, "wu": wu, "wd": wd}, (5, 4))
    x = rand(5, 4)

    def fn(cp):
        from support.attnlrp_ref import identity
        return lambda x: (identity(F.silu, x @ t(wg)) * (x @ t(wu))) @ t(wd)

    attn = check(model, x, fn(False), [0, 1, 2, 0, 1])
    cp = check(model, x, fn(True), [0, 1, 2, 0, 1], cp=True)
    assert np.abs(attn - cp).max() > 1e-3  # the two rules differ


def test_softmax_inside_with_masked_positions():
    """scores = x·W1 + mask (−inf and the dtype's lowest value at some positions); the
    softmax's Taylor rule gives those positions 0, never NaN."""
    w1, w2 = rand(4, 5), rand(5, 3)
    mask = np.zeros(5, np.float32)
    mask[1], mask[3] = -np.inf, np.finfo(np.float32).min
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["s"]),
        helper.make_node("Add", ["s", "mask"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "w2"], ["logits"]),
    ]
    model = graph(nodes, {"w1": w1, "w2": w2, "mask": mask}, (3, 4))
    x = rand(3, 4)
    fn = lambda x: F.softmax(x @ t(w1) + t(mask), dim=-1) @ t(w2)  # noqa: E731
    r = check(model, x, fn, [0, 1, 2])
    assert np.isfinite(r).all()
    # the relevance at the softmax input itself: masked positions hold exactly 0
    compiled = lrpc.compile(model, lrpc.AttnLRP(EPS), relevance_at=["sm"])
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    at = sess.run(["relevance_at:sm"], {"x": x})[0]
    assert np.isfinite(at).all() and (at[:, [1, 3]] == 0).all() and np.abs(at).sum() > 0


def test_attention_head_attnlrp_and_cp_lrp():
    """One head: softmax(q·kᵀ/√d)·v with q, k, v projections of x [N, T, 4]."""
    wq, wk, wv, wo = rand(4, 4), rand(4, 4), rand(4, 4), rand(4, 2)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["logits"], axes=[1], keepdims=0),
    ]
    model = graph(nodes, {"wq": wq, "wk": wk, "wv": wv, "wo": wo, "scale": np.float32(0.5)}, (2, 6, 4))
    x = rand(2, 6, 4)

    def fn(x):
        q, k, v = x @ t(wq), x @ t(wk), x @ t(wv)
        p = F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.5, dim=-1)
        return (torch.matmul(p, v) @ t(wo)).mean(1)

    check(model, x, fn, [0, 1])
    check(model, x, fn, [0, 1], cp=True)


def test_where_routes_each_position_to_its_branch():
    w = rand(4, 4)
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["pos"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Where", ["pos", "h", "c"], ["y"]),
        helper.make_node("MatMul", ["y", "w2"], ["logits"]),
    ]
    w2 = rand(4, 3)
    model = graph(nodes, {"w": w, "w2": w2, "zero": np.float32(0), "c": C4}, (5, 4))
    x = rand(5, 4)
    check(model, x, lambda x: torch.where(x > 0, x @ t(w), t(C4)) @ t(w2), [0, 1, 2, 0, 1])


def test_gather_of_the_class_token_and_expand_and_neg():
    """x [N, T, 4] -> -Expand(x[:, :1]) + x -> Gather(position 0) -> MatMul."""
    nodes = [
        helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["first"]),
        helper.make_node("Expand", ["first", "shape"], ["wide"]),
        helper.make_node("Neg", ["wide"], ["neg"]),
        helper.make_node("Mul", ["x", "c"], ["xc"]),
        helper.make_node("Add", ["xc", "neg"], ["d"]),
        helper.make_node("Gather", ["d", "index"], ["cls"], axis=1),
        helper.make_node("MatMul", ["cls", "w"], ["logits"]),
    ]
    inits = {"s0": np.array([1], np.int64), "s1": np.array([2], np.int64), "ax": np.array([1], np.int64),
             "shape": np.array([1, 5, 1], np.int64), "index": np.array(2, np.int64), "w": W43, "c": C4}
    model = graph(nodes, inits, (2, 5, 4))
    x = rand(2, 5, 4)
    check(model, x, lambda x: ((x * t(C4)) - x[:, 1:2].expand(-1, 5, -1))[:, 2] @ t(W43), [0, 2])


def test_rms_normalization_op():
    scale = rand(4) + 1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("RMSNormalization", ["h", "scale"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w"], ["logits"])]
    w1 = rand(4, 4)
    model = graph(nodes, {"w1": w1, "scale": scale, "w": W43}, (3, 4), opset=23)

    def fn(x):
        h = x @ t(w1)
        return h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-5) * t(scale) @ t(W43)

    check(model, rand(3, 4), fn, [0, 1, 2])
    rules = lrpc.lrp_rules(model, lrpc.AttnLRP())
    assert [repr(r) for layer, r in rules if layer.op_type == "RMSNormalization"] == ["LayerNormRule(epsilon=1e-06)"]


@pytest.mark.parametrize("rule", [lrpc.ZPlusRule(), lrpc.FlatRule()])
def test_input_modifying_rules_are_refused_on_products(rule):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "h"], ["sq"]),
             helper.make_node("MatMul", ["sq", "w2"], ["logits"])]
    model = graph(nodes, {"w": rand(4, 4), "w2": W43}, (3, 4))
    with pytest.raises(lrpc.IncompatibleRuleError, match="not linear"):
        lrpc.compile(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule()), lrpc.GlobalTypeMap(Mul=rule)))
