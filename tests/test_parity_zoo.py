"""lrpc against Zennit on identical weights: LeNet, VGG, ResNet (BatchNorm + residual Add),
an MLP and a U-Net (bilinear upsampling, a concatenated skip), exported by both torch exporters (and once without constant folding, so
BatchNormalization nodes reach lrpc), for every preset.

The Zennit side mirrors each preset's rule map exactly (tests/support/zennit_ref.py) and
runs in float64; the tolerance is max|R_lrpc - R_zennit| <= 1e-3 * max|R_zennit|.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lrpc
from support.cases import BOX
from support.cases import preset as make_preset
from support import zoo
from support.export import zoo_onnx_bytes
from support.zennit_ref import PRESETS, composite, zennit_relevance

EXPORTS = {
    "legacy": dict(dynamo=False),
    "dynamo": dict(dynamo=True),
    "legacy_no_folding": dict(dynamo=False, do_constant_folding=False),
}
def zennit_preset(name: str):
    return composite(name, **BOX) if name == "EpsilonGammaBox" else composite(name)


def explain(onnx_bytes: bytes, x: np.ndarray, composite_, target=None, normalize=True):
    analyzer = lrpc.LRP(onnx.load_from_string(onnx_bytes), composite_, normalize_output_relevance=normalize,
                        providers=["CPUExecutionProvider"])
    return analyzer.analyze(x, target)


CASES = [
    (model, export)
    for model in ("lenet", "vgg", "vgg_avg", "resnet", "mlp")
    for export in ("legacy", "dynamo")
] + [("resnet", "legacy_no_folding"), ("lenet", "legacy_no_folding"), ("unet", "legacy"), ("unet", "dynamo")]


@pytest.mark.parametrize("model_name,export", CASES, ids=[f"{m}-{e}" for m, e in CASES])
def test_presets_match_zennit(model_name, export):
    model = zoo.build(model_name, seed=0)
    data = zoo_onnx_bytes(model_name, seed=0, **EXPORTS[export])
    if export == "legacy_no_folding" and model_name == "resnet":
        assert "BatchNormalization" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    x = zoo.example_input(model_name, 3, seed=1)
    for preset in PRESETS:
        expl = explain(data, x, make_preset(preset))
        ref = zennit_relevance(model, x, expl.output_selection, zennit_preset(preset), double=True)
        err = np.abs(expl.val - ref).max() / np.abs(ref).max()
        assert err <= 1e-3, f"{preset}: relative error {err:.2e}"
        np.testing.assert_array_equal(expl.output_selection, np.argmax(expl.output, axis=1))


@pytest.mark.parametrize("model_name", ["lenet", "resnet"])
def test_explicit_targets_and_unnormalized_output_relevance(model_name):
    model = zoo.build(model_name, seed=3)
    data = zoo_onnx_bytes(model_name, seed=3)
    x = zoo.example_input(model_name, 4, seed=2)
    target = np.array([0, 3, 9, 5])
    for normalize in (True, False):
        expl = explain(data, x, lrpc.EpsilonPlusFlat(), target=target, normalize=normalize)
        ref = zennit_relevance(model, x, target, composite("EpsilonPlusFlat"), normalize=normalize, double=True)
        assert np.abs(expl.val - ref).max() <= 1e-3 * np.abs(ref).max()
        np.testing.assert_array_equal(expl.output_selection, target)


@pytest.mark.parametrize("model_name", ["lenet", "vgg", "vgg_avg", "resnet", "mlp", "unet"])
@pytest.mark.parametrize("export", ["legacy", "dynamo"])
@pytest.mark.parametrize("rule", [lrpc.ZeroRule(), lrpc.EpsilonRule(1e-6)], ids=["Zero", "Epsilon"])
def test_conservation_without_biases(model_name, export, rule):
    """Zero biases and Zero/Epsilon rules: sum(R_in) equals R_out (1, or the logit)."""
    data = zoo_onnx_bytes(model_name, seed=5, zero_bias=True, **EXPORTS[export])
    x = zoo.example_input(model_name, 3, seed=4)
    composite_ = lrpc.Composite(lrpc.GlobalMap(rule), lrpc.GlobalTypeMap({lrpc.ReshapingLayer: lrpc.PassRule()}))
    for normalize in (True, False):
        expl = explain(data, x, composite_, normalize=normalize)
        total = expl.val.reshape(len(x), -1).sum(axis=1)
        start = np.ones(len(x)) if normalize else expl.output[np.arange(len(x)), expl.output_selection]
        np.testing.assert_allclose(total, start, rtol=1e-4, atol=1e-6)
