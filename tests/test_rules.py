"""Each rule against Zennit, on one layer of a real network, with every other layer fixed.

The rule goes on a layer whose input has both signs (the first layer: exercises the
negative-input terms of ZPlus/AlphaBeta/GeneralizedGamma) and on a layer after a ReLU
(where lrpc drops those terms statically). Zennit gets the same rule on the same module
through a name map; everything else is Epsilon on Conv/Linear, gradient through pooling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpc
from lrpc import Composite, ConvLayer, DenseLayer, GlobalTypeMap, LayerMap, ReshapingLayer
from lrpc.symbolic import Sym
from support import zoo
from support.export import zoo_onnx_bytes
from support.zennit_ref import OriginalGamma, import_zennit, name_map_relevance

zennit = import_zennit()
from zennit.core import BasicHook  # noqa: E402
from zennit.rules import AlphaBeta, ClampMod, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus  # noqa: E402

import onnx  # noqa: E402

PER_CHANNEL_LOW = -np.linspace(1.0, 2.0, 3, dtype=np.float32).reshape(1, 3, 1, 1)
PER_CHANNEL_HIGH = np.linspace(2.0, 3.0, 3, dtype=np.float32).reshape(1, 3, 1, 1)

# (lrpc rule, Zennit rule, layers it may go on)
RULES = {
    "Zero": (lambda: lrpc.ZeroRule(), lambda: Epsilon(epsilon=1e-9), "any"),
    "Epsilon": (lambda: lrpc.EpsilonRule(0.01), lambda: Epsilon(epsilon=0.01), "any"),
    "Gamma": (lambda: lrpc.GammaRule(0.25), lambda: OriginalGamma(gamma=0.25), "any"),
    "GeneralizedGamma": (lambda: lrpc.GeneralizedGammaRule(0.5), lambda: Gamma(gamma=0.5), "any"),
    "ZPlus": (lambda: lrpc.ZPlusRule(), lambda: ZPlus(), "any"),
    "AlphaBeta": (lambda: lrpc.AlphaBetaRule(2.0, 1.0), lambda: AlphaBeta(alpha=2.0, beta=1.0), "any"),
    "Alpha1Beta0": (lambda: lrpc.AlphaBetaRule(1.0, 0.0), lambda: AlphaBeta(alpha=1.0, beta=0.0), "any"),
    "ZBox": (lambda: lrpc.ZBoxRule(-2.0, 2.5), lambda: ZBox(low=-2.0, high=2.5), "first"),
    "ZBoxPerChannel": (
        lambda: lrpc.ZBoxRule(PER_CHANNEL_LOW, PER_CHANNEL_HIGH),
        lambda: ZBox(low=torch.as_tensor(PER_CHANNEL_LOW, dtype=torch.float64),
                     high=torch.as_tensor(PER_CHANNEL_HIGH, dtype=torch.float64)),
        "first-rgb",
    ),
    "WSquare": (lambda: lrpc.WSquareRule(), lambda: WSquare(), "any"),
    "Flat": (lambda: lrpc.FlatRule(), lambda: Flat(), "any"),
}

# (zoo model, lrpc layer index, torch module name, input of mixed sign?)
PLACES = {
    "vgg-first-conv": ("vgg", 0, "conv1_1", True),
    "vgg-inner-conv": ("vgg", 3, "conv2_1", False),
    "mlp-first-dense": ("mlp", 0, "fc1", True),
    "mlp-inner-dense": ("mlp", 1, "fc2", False),
}


def _cases():
    for rule, (_, _, where) in RULES.items():
        for place, (_, _, _, mixed) in PLACES.items():
            if where == "first" and not mixed:
                continue
            if where == "first-rgb" and place != "vgg-first-conv":
                continue
            yield rule, place


def lrpc_relevance(data: bytes, x, target, index: int, rule):
    composite = Composite(
        GlobalTypeMap({ConvLayer: lrpc.EpsilonRule(1e-6), DenseLayer: lrpc.EpsilonRule(1e-6),
                       ReshapingLayer: lrpc.PassRule()}),
        LayerMap(index, rule),
    )
    analyzer = lrpc.LRP(onnx.load_from_string(data), composite, providers=["CPUExecutionProvider"])
    return analyzer.analyze(x, target).val


@pytest.mark.parametrize("rule_name,place", list(_cases()))
def test_rule_matches_zennit(rule_name, place):
    make_lrpc, make_zennit, _ = RULES[rule_name]
    model_name, index, module, _ = PLACES[place]
    model = zoo.build(model_name, seed=11)
    data = zoo_onnx_bytes(model_name, seed=11)
    x = zoo.example_input(model_name, 3, seed=12)
    target = np.array([1, 2, 3])
    got = lrpc_relevance(data, x, target, index, make_lrpc())
    ref = name_map_relevance(model, x, target, {module: make_zennit()}, default=Epsilon(epsilon=1e-6), double=True)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-3, f"relative error {err:.2e}"


# -- a rule written by a user, without touching emission code -------------------------


class PositiveWeightsRule(lrpc.Rule):
    """Keeps only excitatory weights and biases; a clipped stabilizer."""

    epsilon = 1e-3

    def modify_weight(self, weight: Sym) -> Sym:
        return weight.clamp(min=0)

    def modify_bias(self, bias: Sym) -> Sym:
        return bias.clamp(min=0)

    def modify_input(self, a: Sym) -> Sym:
        return a.abs()

    def modify_denominator(self, z: Sym) -> Sym:
        return z + self.epsilon  # z >= 0 here: |a| and W⁺, b⁺


def zennit_positive_weights():
    return BasicHook(
        input_modifiers=[lambda a: a.abs()],
        param_modifiers=[ClampMod(min=0.0)],
        output_modifiers=[lambda z: z],
        gradient_mapper=lambda out_grad, outputs: out_grad / (outputs[0] + 1e-3),
        reducer=lambda inputs, gradients: inputs[0] * gradients[0],
    )


@pytest.mark.parametrize("place", ["vgg-first-conv", "mlp-first-dense"])
def test_user_defined_rule(place):
    model_name, index, module, _ = PLACES[place]
    model = zoo.build(model_name, seed=2)
    data = zoo_onnx_bytes(model_name, seed=2)
    x = zoo.example_input(model_name, 2, seed=3)
    got = lrpc_relevance(data, x, np.array([4, 0]), index, PositiveWeightsRule())
    ref = name_map_relevance(model, x, np.array([4, 0]), {module: zennit_positive_weights()},
                             default=Epsilon(epsilon=1e-6), double=True)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert repr(PositiveWeightsRule()) == "PositiveWeightsRule()"


def test_rules_modifying_inputs_are_refused_on_maxpool():
    data = zoo_onnx_bytes("lenet", seed=0)
    for rule in (lrpc.ZPlusRule(), lrpc.FlatRule(), lrpc.AlphaBetaRule(), PositiveWeightsRule()):
        with pytest.raises(lrpc.IncompatibleRuleError, match="MaxPool"):
            lrpc.compile(onnx.load_from_string(data), Composite(LayerMap(1, rule)))
    for rule in (lrpc.ZeroRule(), lrpc.EpsilonRule(), lrpc.GammaRule(), lrpc.WSquareRule(), lrpc.ZBoxRule(0, 1)):
        ok = rule.is_compatible(lrpc.lrp_rules(onnx.load_from_string(data), Composite())[1][0])
        assert ok == isinstance(rule, (lrpc.ZeroRule, lrpc.EpsilonRule))
