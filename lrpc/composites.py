"""Composites: rule assignment by primitives applied in order (later ones overwrite).

The primitives and presets are those of RelevancePropagation.jl. Layers are indexed
from 0 (Python's convention). Type keys are ONNX op types (``"Conv"``) or the type groups
below; ``LayerMap`` also takes a node name or a glob on node names
(``"/features/features.0/*"``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import IncompatibleRuleError
from .spec import Layer
from .rules import (
    AlphaBetaRule,
    ConstantGateRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    LayerNormRule,
    PassRule,
    Rule,
    TaylorRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)


@dataclass(frozen=True)
class LayerGroup:
    """A named set of ONNX op types usable as a type-map key."""

    name: str
    op_types: frozenset

    def matches(self, layer: Layer) -> bool:
        return layer.op_type in self.op_types

    def __repr__(self) -> str:
        return self.name


ConvLayer = LayerGroup("ConvLayer", frozenset({"Conv", "ConvTranspose"}))
DenseLayer = LayerGroup("DenseLayer", frozenset({"Gemm", "MatMul"}))
PoolingLayer = LayerGroup(
    "PoolingLayer",
    frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "ReduceMean"}),
)
DropoutLayer = LayerGroup("DropoutLayer", frozenset({"Dropout"}))
ReshapingLayer = LayerGroup(
    "ReshapingLayer", frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
)
NormalizationLayer = LayerGroup(
    "NormalizationLayer",
    frozenset({"BatchNormalization", "LRN", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
               "RMSNormalization"}),
)
#: normalizations over features whose statistic LayerNormRule holds constant
LayerNormLayer = LayerGroup("LayerNormLayer", frozenset({"LayerNormalization", "RMSNormalization"}))
MergeLayer = LayerGroup("MergeLayer", frozenset({"Add", "Sub", "Sum", "Concat"}))

GROUPS = {g.name: g for g in (ConvLayer, DenseLayer, PoolingLayer, DropoutLayer, ReshapingLayer,
                              NormalizationLayer, LayerNormLayer, MergeLayer)}


def _key_matches(key, layer: Layer) -> bool:
    if isinstance(key, LayerGroup):
        return key.matches(layer)
    if isinstance(key, str):
        return layer.op_type == key
    raise TypeError(f"type-map key must be an op type string or a layer group, got {key!r}")


def _type_map(mapping, by_type: dict | None = None) -> list[tuple[object, Rule]]:
    """Pairs from a dict (or pairs) plus keywords: ``GlobalTypeMap(LayerNormalization=LayerNormRule())``;
    a keyword that names a layer group means the group."""
    pairs = [] if mapping is None else list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    pairs += [(GROUPS.get(key, key), rule) for key, rule in (by_type or {}).items()]
    for key, rule in pairs:
        if not isinstance(rule, Rule):
            raise TypeError(f"type map value for {key!r} must be a rule, got {rule!r}")
        _key_matches(key, _PROBE)  # validates the key type early
    return pairs


class _Probe:
    op_type = ""


_PROBE = _Probe()


def _rule_for(pairs, layer: Layer) -> Rule | None:
    for key, rule in pairs:
        if _key_matches(key, layer):
            return rule
    return None


def _check_rule(rule) -> Rule:
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a rule, got {rule!r}")
    return rule


def _as_range(r, n: int) -> range:
    if isinstance(r, range):
        return r
    if isinstance(r, slice):
        return range(n)[r]
    if isinstance(r, Sequence) and len(r) == 2:
        return range(int(r[0]), int(r[1]))
    raise TypeError(f"a range must be range(a, b), a slice or (start, stop), got {r!r}")


class Primitive:
    """Assigns rules to some layers; ``apply`` writes into ``rules`` (index -> rule)."""

    def apply(self, layers: list[Layer], rules: list[Rule]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(a) for a in self._args())})"

    def _args(self) -> tuple:
        return ()


class LayerMap(Primitive):
    """Rule for the layer at a flat index, a hierarchical index ``(0, 2)``, with a node
    name, or matching a name glob."""

    def __init__(self, index, rule: Rule):
        self.index, self.rule = index, _check_rule(rule)
        if isinstance(index, list):
            self.index = tuple(index)

    def selects(self, layer: Layer) -> bool:
        if isinstance(self.index, int):
            return layer.index == self.index
        if isinstance(self.index, tuple):
            return layer.path_index == self.index
        name = layer.name
        return name == self.index or fnmatch.fnmatchcase(name, self.index)

    def apply(self, layers, rules):
        hits = [layer for layer in layers if self.selects(layer)]
        if not hits:
            # a typo in a name or an index past the end should not go unnoticed
            raise IncompatibleRuleError(
                f"LayerMap({self.index!r}, ...) matches no layer; the model has {len(layers)} layers "
                f"(0..{len(layers) - 1}; see `lrpc inspect`)"
            )
        for layer in hits:
            rules[layer.index] = self.rule

    def _args(self):
        return (self.index, self.rule)


class GlobalMap(Primitive):
    """One rule for every layer."""

    def __init__(self, rule: Rule):
        self.rule = _check_rule(rule)

    def apply(self, layers, rules):
        for layer in layers:
            rules[layer.index] = self.rule

    def _args(self):
        return (self.rule,)


class RangeMap(Primitive):
    """One rule for the layers in a positional range (``range(2, 5)`` or ``(2, 5)``)."""

    def __init__(self, range_, rule: Rule):
        self.range, self.rule = range_, _check_rule(rule)

    def apply(self, layers, rules):
        for i in _as_range(self.range, len(layers)):
            if 0 <= i < len(layers):
                rules[i] = self.rule

    def _args(self):
        return (self.range, self.rule)


class FirstLayerMap(Primitive):
    """Rule for the first layer with parameters."""

    def __init__(self, rule: Rule):
        self.rule = _check_rule(rule)

    def apply(self, layers, rules):
        for layer in layers:
            if layer.is_first:
                rules[layer.index] = self.rule

    def _args(self):
        return (self.rule,)


class LastLayerMap(FirstLayerMap):
    """Rule for the last layer with parameters."""

    def apply(self, layers, rules):
        for layer in layers:
            if layer.is_last:
                rules[layer.index] = self.rule


class GlobalTypeMap(Primitive):
    """Rules by layer type, for every layer: ``GlobalTypeMap({ConvLayer: ZPlusRule(), "Gemm": EpsilonRule()})``."""

    def __init__(self, mapping=None, /, **by_type):
        self.map = _type_map(mapping, by_type)

    def _selected(self, layers: list[Layer]) -> Iterable[Layer]:
        return layers

    def apply(self, layers, rules):
        for layer in self._selected(layers):
            rule = _rule_for(self.map, layer)
            if rule is not None:
                rules[layer.index] = rule

    def _args(self):
        return ({k: v for k, v in self.map},)


class RangeTypeMap(GlobalTypeMap):
    """A type map restricted to a positional range of layers."""

    def __init__(self, range_, mapping=None, /, **by_type):
        super().__init__(mapping, **by_type)
        self.range = range_

    def _selected(self, layers):
        return [layers[i] for i in _as_range(self.range, len(layers)) if 0 <= i < len(layers)]

    def _args(self):
        return (self.range, {k: v for k, v in self.map})


class FirstLayerTypeMap(GlobalTypeMap):
    """A type map applied to the first layer with parameters."""

    def _selected(self, layers):
        return [layer for layer in layers if layer.is_first]


class LastLayerTypeMap(GlobalTypeMap):
    """A type map applied to the last layer with parameters."""

    def _selected(self, layers):
        return [layer for layer in layers if layer.is_last]


class FirstNTypeMap(GlobalTypeMap):
    """A type map applied to the first ``n`` layers."""

    def __init__(self, n: int, mapping=None, /, **by_type):
        super().__init__(mapping, **by_type)
        self.n = int(n)

    def _selected(self, layers):
        return layers[: self.n]

    def _args(self):
        return (self.n, {k: v for k, v in self.map})


class Composite:
    """``Composite(primitives...)`` or ``Composite(default_rule, primitives...)``.

    Layers no primitive reaches get ``default`` (ZeroRule unless given).
    """

    def __init__(self, *items, default: Rule | None = None, name: str | None = None):
        if items and isinstance(items[0], Rule):
            if default is not None:
                raise TypeError("Composite: default rule given twice")
            default, items = items[0], items[1:]
        for p in items:
            if not isinstance(p, Primitive):
                raise TypeError(f"Composite takes rule-assignment primitives, got {p!r}")
        self.primitives = list(items)
        self.default = default if default is not None else ZeroRule()
        self.name = name

    def assign(self, layers: list[Layer], check: bool = True) -> list[Rule]:
        """One rule per layer; raises IncompatibleRuleError for a rule a layer cannot take."""
        rules: list[Rule] = [self.default] * len(layers)
        for primitive in self.primitives:
            primitive.apply(layers, rules)
        if check:
            for layer, rule in zip(layers, rules):
                if not rule.is_compatible(layer):
                    raise IncompatibleRuleError(
                        f"{rule!r} cannot be applied to layer {layer.index} {layer.describe()}: "
                        f"{rule.incompatibility(layer)}"
                    )
        return rules

    def __repr__(self) -> str:
        if self.name:
            return self.name
        inner = ", ".join(repr(p) for p in self.primitives)
        return f"Composite({inner})"


# -- presets (RelevancePropagation.jl's, with ONNX op types) --------------------------


def _base_map(epsilon: float, conv_rule: Rule) -> dict:
    return {
        ConvLayer: conv_rule,
        DenseLayer: EpsilonRule(epsilon),
        LayerNormLayer: LayerNormRule(),
        NormalizationLayer: PassRule(),
        DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(),
        "Softmax": TaylorRule(),
    }


def EpsilonPlus(epsilon: float = 1e-6) -> Composite:
    """ZPlusRule on convolutions, EpsilonRule on dense layers."""
    return Composite(GlobalTypeMap(_base_map(epsilon, ZPlusRule())), name=f"EpsilonPlus(epsilon={epsilon})")


def EpsilonAlpha2Beta1(epsilon: float = 1e-6) -> Composite:
    """AlphaBetaRule(2, 1) on convolutions, EpsilonRule on dense layers."""
    return Composite(
        GlobalTypeMap(_base_map(epsilon, AlphaBetaRule(2.0, 1.0))), name=f"EpsilonAlpha2Beta1(epsilon={epsilon})"
    )


def EpsilonPlusFlat(epsilon: float = 1e-6) -> Composite:
    """EpsilonPlus, with FlatRule on the first layer when it is a convolution."""
    return Composite(
        GlobalTypeMap(_base_map(epsilon, ZPlusRule())),
        FirstLayerTypeMap({ConvLayer: FlatRule()}),
        name=f"EpsilonPlusFlat(epsilon={epsilon})",
    )


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6) -> Composite:
    """EpsilonAlpha2Beta1, with FlatRule on the first layer when it is a convolution."""
    return Composite(
        GlobalTypeMap(_base_map(epsilon, AlphaBetaRule(2.0, 1.0))),
        FirstLayerTypeMap({ConvLayer: FlatRule()}),
        name=f"EpsilonAlpha2Beta1Flat(epsilon={epsilon})",
    )


def EpsilonGammaBox(low, high, epsilon: float = 1e-6, gamma: float = 0.25) -> Composite:
    """GammaRule on convolutions, ZBoxRule(low, high) on the first convolution."""
    box = ZBoxRule(low, high)
    return Composite(
        GlobalTypeMap(_base_map(epsilon, GammaRule(gamma))),
        FirstLayerTypeMap({ConvLayer: box}),
        name=f"EpsilonGammaBox(low={box._args()['low']!r}, high={box._args()['high']!r}, "
        f"epsilon={epsilon}, gamma={gamma})",
    )


def _transformer_map(epsilon: float) -> dict:
    return {
        LayerNormLayer: LayerNormRule(epsilon),
        NormalizationLayer: PassRule(),
        DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(),
        "Softmax": TaylorRule(),
    }


def AttnLRP(epsilon: float = 1e-6) -> Composite:
    """AttnLRP (Achtibat et al., ICML 2024): the ε-rule on every linear layer and merge,
    products of activations (``Q·Kᵀ``, ``A·V``, gated MLPs) shared equally between their
    factors, the softmax by its Taylor expansion (``TaylorRule``), LayerNorm and RMSNorm by
    ``LayerNormRule``; activations (GELU, SiLU, Tanh, ...) pass relevance unchanged."""
    return Composite(GlobalMap(EpsilonRule(epsilon)), GlobalTypeMap(_transformer_map(epsilon)),
                     name=f"AttnLRP(epsilon={epsilon})")


def CPLRP(epsilon: float = 1e-6) -> Composite:
    """CP-LRP (Ali et al., ICML 2022): as AttnLRP, but the attention probabilities and the
    gates of gated MLPs are constants (``ConstantGateRule``): relevance flows through ``V``
    and the gated branch only; ``Q·Kᵀ`` and the softmax receive none."""
    gated = ConstantGateRule(epsilon)
    return Composite(GlobalMap(EpsilonRule(epsilon)), GlobalTypeMap({**_transformer_map(epsilon), "MatMul": gated,
                                                                     "Mul": gated}),
                     name=f"CPLRP(epsilon={epsilon})")


PRESETS = {
    f.__name__: f for f in (EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox,
                            AttnLRP, CPLRP)
}

PRIMITIVES = {
    c.__name__: c
    for c in (LayerMap, GlobalMap, RangeMap, FirstLayerMap, LastLayerMap, GlobalTypeMap, RangeTypeMap,
              FirstLayerTypeMap, LastLayerTypeMap, FirstNTypeMap)
}
