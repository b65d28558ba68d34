"""Architecture families (tests/support/families.py) through both torch exporters and every preset.

For each family (AlexNet with LRN, VGG, ResNet-50 bottlenecks, DenseNet, Inception, SqueezeNet,
ShuffleNetV2, MobileNetV2 / V3, U-Net) and each exporter (legacy opset 17, dynamo opset 18):

- the export itself runs in onnxruntime with batches of 1 and 3 and matches torch;
- the model compiles with each preset, explains a batch of 2 with finite, non-zero relevance of
  the input's shape, and the compiled file's model outputs equal the export's;
- with every bias and BatchNorm shift zeroed, EpsilonPlus conserves relevance: per sample,
  sum(relevance) is 1 (normalized) or the explained logit, within 1e-3 relative.

Exports are memoized per process (``families.family_onnx_bytes``); dynamo exports take 1-3 s.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from support.cases import PRESET_NAMES
from support.cases import preset as make_preset
from support import families
from support.export import INPUT_NAME

EXPORTERS = {"legacy": False, "dynamo": True}


CASES = [(family, exporter) for family in families.FAMILIES for exporter in EXPORTERS]
CASE_IDS = [f"{family}-{exporter}" for family, exporter in CASES]

SEED = 0


def export_bytes(family: str, exporter: str, zero_bias: bool = False) -> bytes:
    return families.family_onnx_bytes(family, SEED, EXPORTERS[exporter], zero_bias)


@functools.cache
def _session(family: str, exporter: str, zero_bias: bool) -> ort.InferenceSession:
    return ort.InferenceSession(export_bytes(family, exporter, zero_bias), providers=["CPUExecutionProvider"])


def export_outputs(family: str, exporter: str, x: np.ndarray, zero_bias: bool = False) -> np.ndarray:
    """The logits of the plain export, run by onnxruntime."""
    return _session(family, exporter, zero_bias).run(None, {INPUT_NAME: x})[0]


def analyzer(family: str, exporter: str, composite, zero_bias: bool = False, normalize: bool = True):
    model = onnx.load_from_string(export_bytes(family, exporter, zero_bias))
    return lrpc.LRP(model, composite, normalize_output_relevance=normalize, providers=["CPUExecutionProvider"])


def assert_close_to(actual: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    """``max|actual - expected| <= tol * max(1, max|expected|)``."""
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"{what}: max abs difference {err:.3e} (scale {scale:.3g}, tolerance {tol:g})"


# --------------------------------------------------------------------------------------------------
# the families themselves
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", families.FAMILIES)
def test_family_builds_and_zero_biases_remove_every_shift(family):
    model = families.build(family, SEED)
    assert not model.training
    x = families.example_input(family, 2, seed=1)
    logits = families.forward_numpy(model, x)
    assert logits.shape == (2, families.NUM_CLASSES) and np.isfinite(logits).all()
    # seeded: the same seed gives the same model, another seed another one
    np.testing.assert_array_equal(families.forward_numpy(families.build(family, SEED), x), logits)
    assert not np.allclose(families.forward_numpy(families.build(family, SEED + 1), x), logits)
    # every family is f(0) = 0 once its biases and BatchNorm shifts are zero (ReLU, LRN, Hardswish
    # and gating all map 0 to 0), and not before
    zeros = np.zeros_like(x)
    assert np.abs(families.forward_numpy(model, zeros)).max() > 1e-3
    assert np.abs(families.forward_numpy(families.zero_biases(model), zeros)).max() == 0.0


@pytest.mark.parametrize("family,exporter", CASES, ids=CASE_IDS)
def test_export_runs_in_onnxruntime(family, exporter):
    model = families.build(family, SEED)
    for n in (1, 3):
        x = families.example_input(family, n, seed=n)
        out = export_outputs(family, exporter, x)
        assert out.shape == (n, families.NUM_CLASSES)
        assert_close_to(out, families.forward_numpy(model, x), 1e-4, f"export vs torch, batch {n}")


# --------------------------------------------------------------------------------------------------
# every preset compiles, explains, and keeps the model's outputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("family,exporter", CASES, ids=CASE_IDS)
def test_preset_compiles_and_explains(family, exporter, preset):
    x = families.example_input(family, 2, seed=1)
    expl = analyzer(family, exporter, make_preset(preset)).analyze(x)
    assert expl.val.shape == x.shape
    assert expl.val.dtype == x.dtype
    assert np.isfinite(expl.val).all(), "relevance is not finite"
    assert np.abs(expl.val).reshape(len(x), -1).sum(axis=1).min() > 0, "a sample has no relevance at all"
    assert_close_to(expl.output, export_outputs(family, exporter, x), 1e-5, "compiled model outputs vs the export")
    np.testing.assert_array_equal(expl.output_selection, np.argmax(expl.output, axis=1))


# --------------------------------------------------------------------------------------------------
# conservation: no biases, EpsilonPlus
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,exporter", CASES, ids=CASE_IDS)
def test_epsilon_plus_conserves_relevance_without_biases(family, exporter):
    x = families.example_input(family, 3, seed=2)
    reference = export_outputs(family, exporter, x, zero_bias=True)
    for normalize in (True, False):
        expl = analyzer(family, exporter, lrpc.EpsilonPlus(), zero_bias=True, normalize=normalize).analyze(x)
        assert_close_to(expl.output, reference, 1e-5, "compiled model outputs vs the export")
        total = expl.val.astype(np.float64).reshape(len(x), -1).sum(axis=1)
        explained = expl.output[np.arange(len(x)), expl.output_selection].astype(np.float64)
        start = np.ones(len(x)) if normalize else explained
        np.testing.assert_allclose(
            total, start, rtol=1e-3, atol=0,
            err_msg=f"sum(relevance) per sample vs {'1' if normalize else 'the explained logit'}",
        )
