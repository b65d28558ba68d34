"""K classes per sample in one call (``targets=K``): the same relevance as K single calls,
with the forward pass and the rule's denominators built once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lrpc
from support import families, transformer_zoo

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def model(name: str):
    if name == "digits":
        return onnx.load(DIGITS / "digits_cnn.onnx"), lrpc.EpsilonPlus(), np.load(DIGITS / "samples.npy")[:5]
    if name == "vit":
        return (onnx.load_from_string(transformer_zoo.export_bytes("vit")), lrpc.AttnLRP(),
                transformer_zoo.example("vit", 3).pixels)
    return onnx.load_from_string(families.family_onnx_bytes(name)), lrpc.EpsilonPlusFlat(), \
        families.example_input(name, 3, seed=2)


@pytest.mark.parametrize("name", ["digits", "resnet18", "mobilenet_v2", "vit"])
def test_k_targets_equal_k_single_calls(name):
    proto, composite, x = model(name)
    several = lrpc.LRP(proto, composite, targets=3)
    single = lrpc.LRP(proto, composite)
    n = len(x)
    classes = single.analyze(x[:1]).output.reshape(1, -1).shape[1]
    chosen = np.array([[1, -1, 4], [0, 2, -1], [7, 8, 9], [-1, -1, -1], [3, 3, 3]][:n], dtype=np.int64)
    chosen = np.where(chosen < 0, chosen, chosen % classes)
    for selection in (None, chosen):
        explained = several.analyze(x, selection)
        assert explained.val.shape == (3 * n, *x.shape[1:])
        order = np.argsort(-explained.output.reshape(n, -1), axis=1, kind="stable")
        for j in range(3):
            rows = slice(j * n, (j + 1) * n)
            classes = explained.output_selection[rows]
            want = order[:, j] if selection is None else np.where(chosen[:, j] < 0, order[:, j], chosen[:, j])
            np.testing.assert_array_equal(classes, want)  # -1 in column j: the j-th highest class
            reference = single.analyze(x, classes).val
            scale = np.abs(reference).max()
            assert np.abs(explained.val[rows] - reference).max() <= 1e-6 * max(scale, 1.0), (name, j)


def test_only_the_relevance_passes_are_repeated():
    """Per extra target the graph grows by the backward convolutions of one target, not by
    a forward pass or denominators: K targets hold (forward + denominators) + K backwards."""
    proto = onnx.load_from_string(families.family_onnx_bytes("resnet18"))

    def convs(k: int) -> int:
        compiled = lrpc.compile(proto, lrpc.EpsilonPlusFlat(), targets=k)
        return sum(node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for node in compiled.graph.node)

    one, two, four = convs(1), convs(2), convs(4)
    per_target = two - one
    assert four == one + 3 * per_target
    forward_and_denominators = one - per_target
    assert forward_and_denominators > 0.3 * one, (one, per_target)  # shared: built once


def test_refusals():
    proto, composite, x = model("digits")
    with pytest.raises(lrpc.LrpcError, match="only 10 classes"):
        lrpc.compile(proto, composite, targets=11)
    with pytest.raises(lrpc.LrpcError, match="do not combine"):
        lrpc.compile(proto, composite, targets=2, report=True)
    several = lrpc.LRP(proto, composite, targets=2)
    with pytest.raises(lrpc.TargetError, match="2 classes per sample"):
        several.analyze(x, [1, 2, 3])
    with pytest.raises(lrpc.TargetError, match="out of range"):
        several.analyze(x, [[1, 10]] * len(x))


def test_command_line(cli, tmp_path):
    done = cli("compile", DIGITS / "digits_cnn.onnx", "-o", tmp_path / "k.lrp.onnx", "--targets", "3", "-q")
    assert done.code == 0, done.err
    compiled = onnx.load(tmp_path / "k.lrp.onnx")
    target = next(i for i in compiled.graph.input if i.name == "lrp_target")
    assert [d.dim_value or d.dim_param for d in target.type.tensor_type.shape.dim][1] == 3
    done = cli("explain", tmp_path / "k.lrp.onnx", DIGITS / "samples.npy", "-o", tmp_path / "out")
    assert done.code == 0, done.err
    heatmaps = sorted(p.name for p in (tmp_path / "out").glob("heatmap_000_class*.png"))
    assert len(heatmaps) == 3
    both = cli("explain", DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy", "-o", tmp_path / "o2", "--target", "3",
               "--targets", "2")
    assert both.code == 2 and "not both" in both.err
