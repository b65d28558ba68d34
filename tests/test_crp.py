"""Concept Relevance Propagation against a Zennit-based reference (masked backward hook),
and intermediate relevances as extra outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import lrpc
from support import zoo
from support.crp_ref import crp
from support.export import zoo_onnx_bytes
from support.zennit_ref import composite, zennit_relevance

CASES = {
    "top3": (lrpc.TopNFeatures(3), ("top", 3)),
    "indexed": (lrpc.IndexedFeatures(1, 2, 10), ("indexed", [1, 2, 10])),
}


@pytest.fixture(scope="module")
def lenet():
    return zoo.build("lenet", seed=4), onnx.load_from_string(zoo_onnx_bytes("lenet", seed=4))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_crp_matches_the_reference(case, dynamo, lenet):
    model, _ = lenet
    exported = onnx.load_from_string(zoo_onnx_bytes("lenet", seed=4, dynamo=dynamo))
    features, ref_features = CASES[case]
    x = zoo.example_input("lenet", 3, seed=5)
    analyzer = lrpc.CRP(lrpc.LRP(exported, lrpc.EpsilonPlusFlat()), 2, features)  # layer 2: conv2
    expl = analyzer.analyze(x)
    ref = crp(model, x, expl.output_selection, composite("EpsilonPlusFlat"), "conv2", ref_features)
    assert expl.val.shape == ref.relevance.shape == (features.count() * 3, *x.shape[1:])
    np.testing.assert_array_equal(expl.extras["features"], ref.indices)
    err = np.abs(expl.val - ref.relevance).max() / np.abs(ref.relevance).max()
    assert err <= 1e-3, f"relative error {err:.2e}"
    assert expl.analyzer == "CRP" and expl.output.shape == (3, 10)


def test_rows_are_features_first_then_inputs(lenet):
    _, exported = lenet
    x = zoo.example_input("lenet", 2, seed=6)
    lrp = lrpc.LRP(exported, lrpc.EpsilonPlus())
    both = lrpc.CRP(lrp, 2, lrpc.IndexedFeatures(3, 7)).analyze(x).val
    for k, feature in enumerate((3, 7)):
        alone = lrpc.CRP(lrp, 2, lrpc.IndexedFeatures(feature)).analyze(x).val
        np.testing.assert_allclose(both[k * 2:(k + 1) * 2], alone, rtol=1e-5, atol=1e-7)


def test_all_features_add_up_to_lrp(lenet):
    model, exported = lenet
    x = zoo.example_input("lenet", 2, seed=7)
    lrp = lrpc.LRP(exported, lrpc.EpsilonPlus())
    every = lrpc.CRP(lrp, 2, lrpc.IndexedFeatures(*range(16))).analyze(x, [4, 1]).val
    total = every.reshape(16, 2, *x.shape[1:]).sum(axis=0)
    np.testing.assert_allclose(total, lrp.analyze(x, [4, 1]).val, rtol=1e-4, atol=1e-6)
    ref = zennit_relevance(model, x, [4, 1], composite("EpsilonPlus"), double=True)
    assert np.abs(total - ref).max() <= 1e-3 * np.abs(ref).max()


def test_crp_on_a_dense_layer_and_by_name():
    model = zoo.build("mlp", seed=2)
    exported = onnx.load_from_string(zoo_onnx_bytes("mlp", seed=2))
    x = zoo.example_input("mlp", 2, seed=3)
    lrp = lrpc.LRP(exported, lrpc.EpsilonPlus())
    name = lrpc.lrp_rules(exported, lrpc.EpsilonPlus())[1][0].name  # fc2, by node name
    expl = lrpc.CRP(lrp, name, lrpc.TopNFeatures(2)).analyze(x)
    ref = crp(model, x, expl.output_selection, composite("EpsilonPlus"), "fc2", ("top", 2))
    np.testing.assert_array_equal(expl.extras["features"], ref.indices)
    assert np.abs(expl.val - ref.relevance).max() <= 1e-3 * np.abs(ref.relevance).max()


@pytest.mark.parametrize(
    "layer,features,message",
    [
        (99, lrpc.TopNFeatures(2), "layer 99 does not exist"),
        ("/no/such/*", lrpc.TopNFeatures(2), "matches no layer"),
        (2, lrpc.IndexedFeatures(16), r"the layer has 16 features \(0..15\)"),
        (2, lrpc.TopNFeatures(17), "only 16 features"),
    ],
)
def test_bad_crp_requests(layer, features, message, lenet):
    _, exported = lenet
    with pytest.raises(lrpc.LrpcError, match=message):
        lrpc.CRP(lrpc.LRP(exported), layer, features)


def test_crp_needs_a_plain_model(lenet):
    _, exported = lenet
    compiled = lrpc.LRP(lrpc.compile(exported))
    with pytest.raises(lrpc.LrpcError, match="plain"):
        lrpc.CRP(compiled, 2, lrpc.TopNFeatures(1))


def test_relevance_at_layers(lenet):
    """Relevance at a layer's output, as an extra output: it is what flows on down, so with
    Epsilon everywhere and no biases its per-sample sum is conserved layer by layer."""
    data = zoo_onnx_bytes("lenet", seed=8, zero_bias=True)
    rules = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)), lrpc.GlobalTypeMap({lrpc.ReshapingLayer: lrpc.PassRule()}))
    analyzer = lrpc.LRP(onnx.load_from_string(data), rules, relevance_at=[0, 2, "/fc1/Gemm"])
    x = zoo.example_input("lenet", 2, seed=9)
    expl = analyzer.analyze(x)
    extras = {k: v for k, v in expl.extras.items() if k.startswith("relevance_at:")}
    assert len(extras) == 3
    for value in extras.values():
        np.testing.assert_allclose(value.reshape(2, -1).sum(axis=1), 1.0, rtol=1e-4)
    conv1 = next(v for k, v in extras.items() if "conv1" in k)
    assert conv1.shape == (2, 6, 16, 16)


def test_crp_from_the_command_line(tmp_path, lenet, capsys):
    from lrpc.cli import main

    _, exported = lenet
    src = tmp_path / "lenet.onnx"
    onnx.save(exported, src)
    out = tmp_path / "lenet.crp.onnx"
    assert main(["compile", str(src), "-o", str(out), "--crp-layer", "2", "--features", "top:4",
                 "--relevance-at", "0"]) == 0
    names = [o.name for o in onnx.load(out).graph.output]
    assert names[1:3] == ["relevance", "crp_features"] and names[3].startswith("relevance_at:")
    assert main(["compile", str(src), "-o", str(out), "--features", "1,2"]) == 2
    assert "--crp-layer and --features go together" in capsys.readouterr().err
    assert main(["compile", str(src), "-o", str(out), "--crp-layer", "2", "--features", "top:x"]) == 2
    assert "--features must be 'top:N'" in capsys.readouterr().err


def test_explain_writes_a_heatmap_per_crp_feature_and_sample(tmp_path, lenet, cli):
    _, exported = lenet
    src, out = tmp_path / "lenet.onnx", tmp_path / "lenet.crp.onnx"
    onnx.save(exported, src)
    assert cli("compile", src, "-o", out, "--crp-layer", "2", "--features", "top:2").code == 0
    batch = tmp_path / "x.npy"
    x = zoo.example_input("lenet", 2, seed=1)
    np.save(batch, x)
    result = cli("explain", out, batch, "-o", tmp_path / "e")
    assert result.code == 0, result.err
    expl = lrpc.CRP(lrpc.LRP(str(src)), 2, lrpc.TopNFeatures(2)).analyze(x)
    features = expl.extras["features"]  # [F, N]
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    names = [f"heatmap_{i:03d}_feature{int(features[f, i])}.png" for i in range(2) for f in range(2)]
    assert [e["heatmap"] for e in summary] == names and [e["feature"] for e in summary] == [
        int(features[f, i]) for i in range(2) for f in range(2)]
    npz = np.load(tmp_path / "e" / "relevance.npz")
    rows = [f * 2 + i for i in range(2) for f in range(2)]  # sample-major in the file, features first in the API
    np.testing.assert_allclose(npz["relevance"], expl.val[rows], rtol=1e-5, atol=1e-7)
    assert npz["sample"].tolist() == [0, 0, 1, 1]
