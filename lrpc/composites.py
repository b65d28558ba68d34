"""Composites: rule assignment by primitives applied in order (later ones overwrite).

The primitives and presets are those of RelevancePropagation.jl. Layers are indexed
from 0 (Python's convention). Type keys are ONNX op types (``"Conv"``) or the type groups
below; ``LayerMap`` also takes a node name or a glob on node names
(``"/features/features.0/*"``).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import onnx

from . import validate
from .errors import IncompatibleRuleError, ParameterError
from .spec import Layer
from .rules import (
    AlphaBetaRule,
    ConstantGateRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    LayerNormRule,
    MergeRule,
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
    return layer.op_type == key


def known_op_type(name: str) -> bool:
    """An ONNX op, a registered one, or a pattern lrpc fuses (SiLU, RMSNormalization)."""
    from .registry import REGISTRY

    return name in REGISTRY or onnx.defs.has(name)


def _type_key(key):
    if isinstance(key, LayerGroup):
        return key
    if not isinstance(key, str):
        raise ParameterError(f"a type-map key must be an op type name or a layer group, got {key!r}")
    if key in GROUPS:
        return GROUPS[key]
    if not known_op_type(key):
        close = difflib.get_close_matches(key, [*GROUPS, *_op_names()], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParameterError(f"{key!r} is neither an ONNX op type nor a layer group{hint}")
    return key


def _op_names() -> list[str]:
    from .registry import REGISTRY

    return sorted({*REGISTRY, *(schema.name for schema in onnx.defs.get_all_schemas())})


def _type_map(mapping, by_type: dict | None = None) -> list[tuple[object, Rule]]:
    """Pairs from a dict (or pairs) plus keywords: ``GlobalTypeMap(LayerNormalization=LayerNormRule())``;
    a name that is a layer group means the group; other names must be op types."""
    if mapping is not None and not isinstance(mapping, (Mapping, list, tuple)):
        raise ParameterError(f"a type map must be a dict of op type -> rule, got {mapping!r}")
    pairs = [] if mapping is None else list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    pairs += list((by_type or {}).items())
    checked = []
    for key, rule in pairs:
        if not isinstance(rule, Rule):
            raise ParameterError(f"type map value for {key!r} must be a rule, got {rule!r}")
        checked.append((_type_key(key), rule))
    return checked


def _rule_for(pairs, layer: Layer) -> Rule | None:
    for key, rule in pairs:
        if _key_matches(key, layer):
            return rule
    return None


def _check_rule(rule) -> Rule:
    if not isinstance(rule, Rule):
        raise ParameterError(f"expected a rule, got {rule!r}")
    return rule


def _check_range(r):
    """``range(a, b[, step])`` or ``(a, b)``: whole numbers, 0 <= a <= b, step >= 1; a slice as is."""
    if isinstance(r, slice):
        return r
    if isinstance(r, range):
        start, stop, step = r.start, r.stop, r.step
    elif isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2:
        start, stop, step = r[0], r[1], 1
    else:
        raise ParameterError(f"a range must be range(a, b), a slice or (start, stop), got {r!r}")
    start = validate.integer("range start", start, minimum=0)
    stop = validate.integer("range stop", stop, minimum=start)
    step = validate.integer("range step", step, minimum=1)
    return range(start, stop, step)


def _as_range(r, n: int) -> range:
    """The layer indices of ``r`` below ``n``, without walking a huge range."""
    if isinstance(r, slice):
        return range(n)[r]
    return range(r.start, min(r.stop, n) if r.start < n else r.start, r.step)


class Primitive:
    """Assigns rules to some layers; ``apply`` writes into ``rules`` (index -> rule).

    ``strict`` (set for primitives a user wrote in an expression or rules file, not for
    those inside presets): matching no layer is an error rather than a silent no-op.
    """

    strict = False

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
        if isinstance(self.index, tuple):
            self.index = tuple(validate.integer("LayerMap: hierarchical index", i, minimum=0) for i in self.index)
        elif not isinstance(self.index, str):
            self.index = validate.integer("LayerMap: index", index, minimum=0)

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
        self.range, self.rule = _check_range(range_), _check_rule(rule)

    def apply(self, layers, rules):
        hits = _as_range(self.range, len(layers))
        if not hits:
            raise IncompatibleRuleError(f"RangeMap({self.range!r}, ...) matches no layer; the model has "
                                        f"{len(layers)} layers (0..{len(layers) - 1}; see `lrpc inspect`)")
        for i in hits:
            rules[i] = self.rule

    def _args(self):
        return (self.range, self.rule)


class FirstLayerMap(Primitive):
    """Rule for the first layer with parameters."""

    def __init__(self, rule: Rule):
        self.rule = _check_rule(rule)

    def apply(self, layers, rules):
        hits = [layer for layer in layers if self._picks(layer)]
        if self.strict and not hits:
            raise IncompatibleRuleError(f"{type(self).__name__}: the model has no layer with parameters")
        for layer in hits:
            rules[layer.index] = self.rule

    @staticmethod
    def _picks(layer) -> bool:
        return layer.is_first

    def _args(self):
        return (self.rule,)


class LastLayerMap(FirstLayerMap):
    """Rule for the last layer with parameters."""

    @staticmethod
    def _picks(layer) -> bool:
        return layer.is_last


class GlobalTypeMap(Primitive):
    """Rules by layer type, for every layer: ``GlobalTypeMap({ConvLayer: ZPlusRule(), "Gemm": EpsilonRule()})``."""

    def __init__(self, mapping=None, /, **by_type):
        self.map = _type_map(mapping, by_type)

    def _selected(self, layers: list[Layer]) -> Iterable[Layer]:
        return layers

    def apply(self, layers, rules):
        selected = self._selected(layers)
        for layer in selected:
            rule = _rule_for(self.map, layer)
            if rule is not None:
                rules[layer.index] = rule
        if self.strict:
            for key, _ in self.map:
                if not any(_key_matches(key, layer) for layer in selected):
                    present = sorted({layer.op_type for layer in selected})
                    raise IncompatibleRuleError(f"{type(self).__name__}: {key!r} matches no layer (the layer types "
                                                f"here: {', '.join(present) or 'none'})")

    def _args(self):
        return ({k: v for k, v in self.map},)


class RangeTypeMap(GlobalTypeMap):
    """A type map restricted to a positional range of layers."""

    def __init__(self, range_, mapping=None, /, **by_type):
        super().__init__(mapping, **by_type)
        self.range = _check_range(range_)

    def _selected(self, layers):
        hits = _as_range(self.range, len(layers))
        if not hits:
            raise IncompatibleRuleError(f"RangeTypeMap({self.range!r}, ...) matches no layer; the model has "
                                        f"{len(layers)} layers (0..{len(layers) - 1}; see `lrpc inspect`)")
        return [layers[i] for i in hits]

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
        self.n = validate.integer("FirstNTypeMap: n", n, minimum=0)

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
                raise ParameterError("Composite: default rule given twice")
            default, items = items[0], items[1:]
        if default is not None:
            _check_rule(default)
        for p in items:
            if not isinstance(p, Primitive):
                raise ParameterError(f"Composite takes rule-assignment primitives, got {p!r}")
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


def with_merge_epsilon(composite: "Composite", epsilon: float) -> "Composite":
    """``composite`` with ``MergeRule(epsilon)`` on every merge (``--merge-epsilon``)."""
    merged = Composite(*composite.primitives, GlobalTypeMap({MergeLayer: MergeRule(epsilon)}), default=composite.default)
    merged.name = f"{composite!r} + MergeRule(epsilon={epsilon})"
    return merged


def _base_map(epsilon: float, conv_rule: Rule) -> dict:
    return {
        ConvLayer: conv_rule,
        DenseLayer: EpsilonRule(epsilon),
        LayerNormLayer: LayerNormRule(),
        NormalizationLayer: PassRule(),
        DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(),
        # resampling shares each output's relevance by the interpolation weights, as Zennit's
        # gradient through nn.Upsample (no rule there: its backward carries the relevance)
        "Resize": PassRule(),
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
