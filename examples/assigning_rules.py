"""Assigning LRP rules to layers: rule lists, composites, primitives, presets, indices.

Run: python examples/assigning_rules.py
"""

from __future__ import annotations

from pathlib import Path

import lrpc
from lrpc import (
    Composite, ConvLayer, DenseLayer, DropoutLayer, EpsilonRule, FirstLayerMap, FlatRule, GlobalTypeMap, LayerMap,
    PassRule, PoolingLayer, ReshapingLayer, ZeroRule, ZPlusRule,
)

MODEL = Path(__file__).resolve().parent / "digits" / "digits_cnn.onnx"


def main() -> None:
    # Layer indices: flat (from 0) and hierarchical (from the exporter's module paths).
    indices = lrpc.show_layer_indices(MODEL)

    # One rule per layer, in the order of the flat indices.
    rules = [FlatRule(), ZeroRule(), ZPlusRule(), ZeroRule(), PassRule(), EpsilonRule(), EpsilonRule()]
    assert len(rules) == len(indices)
    print(lrpc.LRP(MODEL, rules))

    # The same with a composite: primitives apply in order, later ones overwrite.
    composite = Composite(
        GlobalTypeMap({
            ConvLayer: ZPlusRule(),
            DenseLayer: EpsilonRule(),
            DropoutLayer: PassRule(),
            PoolingLayer: ZeroRule(),
            ReshapingLayer: PassRule(),
        }),
        FirstLayerMap(FlatRule()),
    )
    same = [rule for _, rule in lrpc.lrp_rules(MODEL, composite)]
    assert same == rules
    print("the composite assigns the same rules:", same == rules)

    # A rule for one specific layer, by flat index, hierarchical index or node name.
    for where in (2, indices[2].path, "/features/features.3/Conv"):
        got = lrpc.lrp_rules(MODEL, Composite(LayerMap(where, EpsilonRule())))
        print(f"LayerMap({where!r}) ->", [layer.name for layer, rule in got if rule == EpsilonRule()])

    # Presets.
    print(lrpc.LRP(MODEL, lrpc.EpsilonPlusFlat()))
    for layer, rule in lrpc.lrp_rules(MODEL, lrpc.EpsilonGammaBox(low=0.0, high=1.0)):
        print(f"{layer.index}: {layer.name:36s} {rule!r}")


if __name__ == "__main__":
    main()
