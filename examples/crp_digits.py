"""Concept Relevance Propagation on the bundled digits model.

The relevance at the last convolution is restricted to one feature (channel) at a time;
the batch of explanations is ordered features first, then inputs.

Run: python examples/crp_digits.py [OUTDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import lrpc
from lrpc.heatmap import heatmap, save_png

DIGITS = Path(__file__).resolve().parent / "digits"


def main(outdir: Path) -> None:
    x = np.load(DIGITS / "samples.npy")[:2]
    lrp_analyzer = lrpc.LRP(DIGITS / "digits_cnn.onnx", lrpc.EpsilonPlusFlat())
    print(lrp_analyzer)

    feature_layer = 2  # the second convolution (see lrpc.show_layer_indices)
    for features in (lrpc.TopNFeatures(5), lrpc.IndexedFeatures(1, 2, 10)):
        analyzer = lrpc.CRP(lrp_analyzer, feature_layer, features)
        expl = analyzer.analyze(x)
        n_features, n_inputs = expl.extras["features"].shape
        print(f"{features!r}: relevance {expl.val.shape} = {n_features} features x {n_inputs} inputs")
        print("  feature of each row block:", expl.extras["features"].tolist())
        outdir.mkdir(parents=True, exist_ok=True)
        for row, image in enumerate(heatmap(expl)):
            feature, sample = divmod(row, n_inputs)
            name = f"crp_{type(features).__name__}_f{expl.extras['features'][feature, sample]}_x{sample}.png"
            save_png(image, outdir / name, scale=8)
    print(f"heatmaps in {outdir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("crp_out"))
