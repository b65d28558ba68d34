"""LayerNormRule on its own: against the seed's formula, split and unsplit, and conservation.

The seed (RelevancePropagation.jl's LayerNormRule, LRP-LN of Ali et al. 2022) defines the
rule on a LayerNorm without affine transformation,

    R_i = Σ_j a_i (δ_ij − 1/N) / Σ_l a_l (δ_lj − 1/N) · R_j,

with the affine part (γ, β) a separate layer. The reference below computes exactly that
with explicit N×N matrices in numpy, the affine part and the dense layers by the ε-rule.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support.cases import rand

D = 5
W1, B1, W2, B2 = rand(6, D), rand(D), rand(D, 3), rand(3)
GAMMA, BETA = rand(D) + 1.5, rand(D)
EPS_LN = 1e-5


def model(gamma=GAMMA, beta=BETA, biases=True, depth=1):
    """x [N, 6] -> MatMul(+b) -> LayerNormalization(γ, β) [-> MatMul -> LN ...] -> MatMul(+b) -> logits."""
    nodes, inits, h = [], {"w1": W1, "w2": W2, "gamma": gamma}, "x"
    widths = [W1] + [rand(D, D) for _ in range(depth - 1)]
    for k, w in enumerate(widths):
        inits[f"w_{k}"] = w
        nodes.append(helper.make_node("MatMul", [h, f"w_{k}"], [f"m{k}"]))
        pre = f"m{k}"
        if biases:
            inits[f"b_{k}"] = B1 if k == 0 else rand(D)
            nodes.append(helper.make_node("Add", [pre, f"b_{k}"], [f"h{k}"]))
            pre = f"h{k}"
        ln_inputs = [pre, "gamma"] + (["beta"] if beta is not None else [])
        nodes.append(helper.make_node("LayerNormalization", ln_inputs, [f"y{k}"], axis=-1, epsilon=EPS_LN,
                                      name=f"/block{k}/norm/LayerNormalization"))
        h = f"y{k}"
    if beta is not None:
        inits["beta"] = beta
    nodes.append(helper.make_node("MatMul", [h, "w2"], ["m_out"] if biases else ["logits"]))
    if biases:
        inits["b2"] = B2
        nodes.append(helper.make_node("Add", ["m_out", "b2"], ["logits"]))
    inits.pop("w1")
    g = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def eps_dense(a, w, b, R):
    """ε-rule (ε → 0) through a = input, z = a·w + b."""
    z = a @ w + (0 if b is None else b)
    return a * ((R / z) @ w.T)


def seed_centering(a, R):
    """The seed's formula with explicit matrices: M[n, i, j] = a_i (δ_ij − 1/N)."""
    n = a.shape[-1]
    M = a[:, :, None] * (np.eye(n) - 1.0 / n)[None]
    return (M / M.sum(axis=1, keepdims=True) * R[:, None, :]).sum(axis=2)


def seed_reference(x, target):
    h = x.astype(np.float64) @ W1 + B1
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    c = (h - mu) / np.sqrt(var + EPS_LN)
    y = c * GAMMA + BETA
    logits = y @ W2 + B2
    R = np.zeros_like(logits)
    R[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    R_y = eps_dense(y, W2, B2, R)
    R_c = c * GAMMA * R_y / y  # the affine part (scale and shift) by the ε-rule
    R_h = seed_centering(h, R_c)
    return eps_dense(x.astype(np.float64), W1, B1, R_h)


def run(m, x, composite, target, **kwargs):
    compiled = lrpc.compile(m, composite, normalize_output_relevance=False, **kwargs)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits", "relevance"], {"x": x, "lrp_target": np.asarray(target, np.int64)})


COMPOSITE = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)),
                           lrpc.GlobalTypeMap(LayerNormalization=lrpc.LayerNormRule(epsilon=1e-9)))


@pytest.mark.parametrize("split", [False, True])
def test_layernorm_rule_equals_the_seed_formula(split):
    x = rand(4, 6)
    target = [0, 1, 2, 0]
    logits, R = run(model(), x, COMPOSITE, target, split_layernorm=split)
    expected = seed_reference(x, target)
    error = np.abs(R - expected).max() / np.abs(expected).max()
    assert error < 1e-4, f"max|ΔR|/max|R| = {error:.2e}"
    # the split file computes the same outputs
    reference_logits, _ = run(model(), x, COMPOSITE, target)
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-6)


def test_split_layernorm_gives_the_affine_part_its_own_layers():
    rules = lrpc.lrp_rules(model(), lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule()),
                                                   lrpc.GlobalTypeMap(LayerNormalization=lrpc.LayerNormRule(),
                                                                      Mul=lrpc.ZeroRule())),
                           split_layernorm=True)
    shown = [(layer.op_type, repr(rule)) for layer, rule in rules]
    assert shown[2:5] == [("LayerNormalization", "LayerNormRule(epsilon=1e-06)"), ("Mul", "ZeroRule()"),
                          ("Add", "EpsilonRule(epsilon=1e-06)")]
    compiled = lrpc.compile(model(), split_layernorm=True)
    forward = [n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")]
    assert forward[:5] == ["MatMul", "Add", "LayerNormalization", "Mul", "Add"]


def test_conservation_of_a_bias_free_layernorm_linear_stack():
    """No biases, β = 0, ε → 0: the input relevance sums to the explained logit."""
    m = model(beta=None, biases=False, depth=3)
    x = rand(5, 6)
    target = [2, 1, 0, 2, 1]
    logits, R = run(m, x, COMPOSITE, target)
    want = logits[np.arange(5), target]
    np.testing.assert_allclose(R.sum(axis=1), want, rtol=1e-4, atol=1e-6)
    # presets conserve as well: AttnLRP
    logits, R = run(m, x, lrpc.AttnLRP(epsilon=1e-9), target)
    np.testing.assert_allclose(R.sum(axis=1), want, rtol=1e-4, atol=1e-6)


def test_layernorm_rule_is_refused_on_other_layers():
    with pytest.raises(lrpc.IncompatibleRuleError, match="LayerNormRule applies to LayerNormalization"):
        lrpc.compile(model(), lrpc.Composite(lrpc.GlobalMap(lrpc.LayerNormRule())))


def test_the_presets_assign_layernorm_rule(cli, tmp_path):
    path = tmp_path / "ln.onnx"
    path.write_bytes(model().SerializeToString())
    for composite in ("EpsilonPlus", "AttnLRP", "CPLRP",
                      "Composite(GlobalMap(EpsilonRule()), GlobalTypeMap(LayerNormalization=LayerNormRule()))"):
        result = cli("inspect", path, "--composite", composite)
        assert result.code == 0, result.err
        row = next(line for line in result.out.splitlines() if "LayerNormalization" in line and "│" in line)
        assert "LayerNormRule(epsilon=1e-06)" in row, (composite, row)
