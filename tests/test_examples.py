"""The bundled digits example: it explains sensibly, and the script that made it still runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lrpc

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


@pytest.fixture(scope="module")
def samples():
    return np.load(DIGITS / "samples.npy"), json.loads((DIGITS / "samples_labels.json").read_text())


def test_bundled_model_is_classified_and_explained(samples):
    x, labels = samples
    analyzer = lrpc.LRP(DIGITS / "digits_cnn.onnx", lrpc.EpsilonPlusFlat())
    expl = analyzer.analyze(x)
    assert expl.output.shape == (8, 10)
    np.testing.assert_allclose(expl.output.sum(axis=1), 1.0, rtol=1e-5)  # softmax output kept
    assert expl.output_selection.tolist() == labels
    assert expl.val.shape == x.shape and np.isfinite(expl.val).all()
    # EpsilonPlusFlat keeps most of the unit relevance (biases absorb the rest)
    assert np.all(np.abs(expl.val.reshape(8, -1).sum(axis=1) - 1.0) < 0.25)


def test_explanations_differ_per_target(samples):
    x, _ = samples
    analyzer = lrpc.LRP(DIGITS / "digits_cnn.onnx", lrpc.EpsilonPlus())
    a = analyzer.analyze(x[:1], 0).val
    b = analyzer.analyze(x[:1], 1).val
    assert not np.allclose(a, b)


def test_training_script_reproduces_a_working_model(tmp_path):
    """Retrain (about 10 s) into a temp folder: same graph, accuracy above the bar."""
    done = subprocess.run(
        [sys.executable, str(DIGITS / "train_digits.py"), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(done.stdout.split("test accuracy:")[1].split()[0])
    assert accuracy >= 0.95
    fresh = onnx.load(tmp_path / "digits_cnn.onnx")
    bundled = onnx.load(DIGITS / "digits_cnn.onnx")
    assert [n.op_type for n in fresh.graph.node] == [n.op_type for n in bundled.graph.node]
    assert np.load(tmp_path / "samples.npy").shape == (8, 1, 8, 8)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["custom_layers.py", "assigning_rules.py", "crp_digits.py",
                                    "explain_transformer.py"])
def test_example_scripts_run(script, tmp_path):
    """The runnable docs (README sections mirror them) must not rot."""
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if script == "crp_digits.py":
        assert len(list((tmp_path / "out").glob("crp_*.png"))) == 5 * 2 + 3 * 2
    if script == "custom_layers.py":
        assert "unknown layer type" in done.stdout and "skip_checks: (2, 100)" in done.stdout
    if script == "explain_transformer.py":
        assert "relevance at the word embeddings: (2, 8, 32)" in done.stdout and "same as the API: True" in done.stdout
        assert len(list((tmp_path / "out").glob("sentence_*.html"))) == 2
        assert done.stderr == "", done.stderr
    if script == "assigning_rules.py":
        assert "the composite assigns the same rules: True" in done.stdout
