"""Rule assignment: the ten primitives, type groups, presets, expressions and rules files."""

from __future__ import annotations

import pytest

import lrpc
from lrpc import (
    AlphaBetaRule, Composite, ConvLayer, DenseLayer, EpsilonRule, FirstLayerMap, FirstLayerTypeMap,
    FirstNTypeMap, FlatRule, GammaRule, GlobalMap, GlobalTypeMap, LastLayerMap, LastLayerTypeMap, LayerMap,
    PassRule, PoolingLayer, RangeMap, RangeTypeMap, ReshapingLayer, ZBoxRule, ZeroRule, ZPlusRule,
)
from lrpc.errors import CompositeSyntaxError, IncompatibleRuleError
from lrpc.expressions import load_rules_file, parse_composite
from support.graphs import small_cnn

# layers of small_cnn: 0 Conv, 1 MaxPool, 2 Conv, 3 GlobalAveragePool, 4 Flatten, 5 Gemm, 6 Gemm
MODEL = small_cnn()


def rules_of(composite):
    return [rule for _, rule in lrpc.lrp_rules(MODEL, composite)]


def test_layer_list_skips_activations_and_keeps_topological_order():
    layers = [layer for layer, _ in lrpc.lrp_rules(MODEL, Composite())]
    assert [layer.op_type for layer in layers] == ["Conv", "MaxPool", "Conv", "GlobalAveragePool", "Flatten", "Gemm", "Gemm"]
    assert [layer.index for layer in layers] == list(range(7))
    assert [layer.is_first for layer in layers] == [True] + [False] * 6
    assert [layer.is_last for layer in layers] == [False] * 6 + [True]


def test_default_rule_is_zero_and_can_be_given():
    assert rules_of(Composite()) == [ZeroRule()] * 7
    assert rules_of(Composite(EpsilonRule(0.1))) == [EpsilonRule(0.1)] * 7
    assert rules_of(Composite(LayerMap(0, FlatRule()), default=EpsilonRule(0.3))) == [FlatRule()] + [EpsilonRule(0.3)] * 6


def test_layer_map_by_index_name_and_glob():
    assert rules_of(Composite(LayerMap(2, GammaRule())))[2] == GammaRule()
    by_name = rules_of(Composite(LayerMap("/features/features.3/Conv", ZPlusRule())))
    assert by_name == [ZeroRule(), ZeroRule(), ZPlusRule()] + [ZeroRule()] * 4
    by_glob = rules_of(Composite(LayerMap("/classifier/*", EpsilonRule())))
    assert by_glob == [ZeroRule()] * 5 + [EpsilonRule()] * 2


def test_global_range_first_last_maps():
    assert rules_of(Composite(GlobalMap(EpsilonRule()))) == [EpsilonRule()] * 7
    assert rules_of(Composite(RangeMap(range(1, 3), EpsilonRule()))) == [ZeroRule()] + [EpsilonRule()] * 2 + [ZeroRule()] * 4
    assert rules_of(Composite(RangeMap((5, 7), EpsilonRule())))[5:] == [EpsilonRule()] * 2
    assert rules_of(Composite(FirstLayerMap(FlatRule())))[0] == FlatRule()
    assert rules_of(Composite(LastLayerMap(EpsilonRule(0.5)))) == [ZeroRule()] * 6 + [EpsilonRule(0.5)]


def test_type_maps_with_groups_and_op_types():
    mapping = {ConvLayer: ZPlusRule(), "Gemm": EpsilonRule(), PoolingLayer: ZeroRule(), ReshapingLayer: PassRule()}
    got = rules_of(Composite(GlobalTypeMap(mapping)))
    assert got == [ZPlusRule(), ZeroRule(), ZPlusRule(), ZeroRule(), PassRule(), EpsilonRule(), EpsilonRule()]
    ranged = rules_of(Composite(RangeTypeMap(range(2, 6), {ConvLayer: GammaRule(), DenseLayer: EpsilonRule()})))
    assert ranged == [ZeroRule(), ZeroRule(), GammaRule(), ZeroRule(), ZeroRule(), EpsilonRule(), ZeroRule()]
    first = rules_of(Composite(FirstLayerTypeMap({ConvLayer: FlatRule(), DenseLayer: EpsilonRule()})))
    assert first == [FlatRule()] + [ZeroRule()] * 6
    last = rules_of(Composite(LastLayerTypeMap({ConvLayer: FlatRule(), DenseLayer: EpsilonRule(0.2)})))
    assert last == [ZeroRule()] * 6 + [EpsilonRule(0.2)]
    first_n = rules_of(Composite(FirstNTypeMap(3, {ConvLayer: FlatRule(), PoolingLayer: EpsilonRule()})))
    assert first_n == [FlatRule(), EpsilonRule(), FlatRule()] + [ZeroRule()] * 4


def test_later_primitives_overwrite_earlier_ones():
    got = rules_of(Composite(GlobalMap(EpsilonRule()), LayerMap(0, FlatRule()), GlobalTypeMap({"Gemm": ZeroRule()})))
    assert got == [FlatRule()] + [EpsilonRule()] * 4 + [ZeroRule()] * 2


@pytest.mark.parametrize(
    "preset,conv,first",
    [
        (lrpc.EpsilonPlus(), ZPlusRule(), ZPlusRule()),
        (lrpc.EpsilonPlusFlat(), ZPlusRule(), FlatRule()),
        (lrpc.EpsilonAlpha2Beta1(), AlphaBetaRule(2, 1), AlphaBetaRule(2, 1)),
        (lrpc.EpsilonAlpha2Beta1Flat(), AlphaBetaRule(2, 1), FlatRule()),
        (lrpc.EpsilonGammaBox(-3.0, 3.0), GammaRule(0.25), ZBoxRule(-3.0, 3.0)),
    ],
    ids=["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox"],
)
def test_presets_match_the_reference_maps(preset, conv, first):
    got = rules_of(preset)
    assert got == [first, ZeroRule(), conv, ZeroRule(), PassRule(), EpsilonRule(1e-6), EpsilonRule(1e-6)]


def test_first_layer_flat_only_when_first_parametric_layer_is_conv():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 6), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    mlp = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [r for _, r in lrpc.lrp_rules(mlp, lrpc.EpsilonPlusFlat())] == [EpsilonRule(1e-6)]


def test_incompatible_rule_is_refused_with_the_layer_named():
    with pytest.raises(IncompatibleRuleError, match=r"ZBoxRule.*layer 1 /features/features.2/MaxPool \(MaxPool\)"):
        lrpc.lrp_rules(MODEL, Composite(LayerMap(1, ZBoxRule(0.0, 1.0))))
    with pytest.raises(IncompatibleRuleError, match="MaxPool is not linear"):
        lrpc.lrp_rules(MODEL, Composite(GlobalTypeMap({PoolingLayer: ZPlusRule()})))
    with pytest.raises(IncompatibleRuleError, match="PassRule only applies"):
        lrpc.lrp_rules(MODEL, Composite(GlobalMap(PassRule())))


def test_rule_list_must_match_layer_count():
    rules = [FlatRule(), ZeroRule(), ZPlusRule(), ZeroRule(), PassRule(), EpsilonRule(), EpsilonRule()]
    assert [r for _, r in lrpc.lrp_rules(MODEL, rules)] == rules
    with pytest.raises(lrpc.LrpcError, match="got 2 rules for a model with 7 layers"):
        lrpc.lrp_rules(MODEL, rules[:2])


def test_alpha_beta_must_differ_by_one():
    with pytest.raises(ValueError, match="alpha - beta must equal 1"):
        AlphaBetaRule(2.0, 2.0)


# -- expressions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("EpsilonPlusFlat", lrpc.EpsilonPlusFlat()),
        ("EpsilonGammaBox(low=-3.0, high=3.0)", lrpc.EpsilonGammaBox(-3.0, 3.0)),
        ("Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))", Composite(GlobalMap(EpsilonRule(1e-9)))),
        ("EpsilonRule(epsilon=0.01)", Composite(GlobalMap(EpsilonRule(0.01)))),
        (
            'Composite(GlobalTypeMap({ConvLayer: ZPlusRule(), "Gemm": EpsilonRule()}), FirstLayerMap(FlatRule()), '
            'LayerMap("/classifier/*", GammaRule(gamma=0.5)), RangeMap(range(0, 2), ZeroRule()))',
            Composite(GlobalTypeMap({ConvLayer: ZPlusRule(), "Gemm": EpsilonRule()}), FirstLayerMap(FlatRule()),
                      LayerMap("/classifier/*", GammaRule(0.5)), RangeMap(range(0, 2), ZeroRule())),
        ),
        ("Composite(EpsilonRule(), FirstNTypeMap(2, {ConvLayer: FlatRule()}))",
         Composite(EpsilonRule(), FirstNTypeMap(2, {ConvLayer: FlatRule()}))),
        ("EpsilonGammaBox(low=[[[-1.0]], [[-2.0]], [[-3.0]]], high=3)",
         lrpc.EpsilonGammaBox([[[-1.0]], [[-2.0]], [[-3.0]]], 3)),
    ],
)
def test_expressions_build_the_same_rules(text, expected):
    assert rules_of(parse_composite(text)) == rules_of(expected)


@pytest.mark.parametrize(
    "text,message",
    [
        ("EpsilonGammaBox(low=", "malformed composite expression"),
        ("Foo()", "unknown name 'Foo'"),
        ("__import__('os').system('true')", "unsupported syntax"),
        ("EpsilonRule(epsilon=1e-6).__class__", "unsupported syntax"),
        ("EpsilonRule(**{'epsilon': 1})", r"\*\*kwargs are not allowed"),
        ("EpsilonGammaBox()", "EpsilonGammaBox: .*missing"),
        ("AlphaBetaRule(alpha=3, beta=1)", "alpha - beta must equal 1"),
        ("Composite(EpsilonRule(), 3)", "Composite takes rule-assignment primitives"),
        ("[1, 2]", "must give a composite or a rule"),
        ("lambda: 0", "unsupported syntax"),
    ],
)
def test_bad_expressions_get_one_clear_error(text, message):
    with pytest.raises(CompositeSyntaxError, match=message):
        parse_composite(text)


def test_rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        'composite = "EpsilonPlus"\n'
        '[[rule]]\nfirst = true\nrule = "FlatRule()"\n'
        '[[rule]]\nlayers = "/classifier/classifier.2/*"\nrule = "EpsilonRule(epsilon=0.25)"\n'
        '[[rule]]\ntype = "PoolingLayer"\nrule = "EpsilonRule(epsilon=0.5)"\n'
        '[[rule]]\nrange = [4, 5]\nrule = "ZeroRule()"\n'
    )
    got = rules_of(load_rules_file(path))
    assert got == [FlatRule(), EpsilonRule(0.5), ZPlusRule(), EpsilonRule(0.5), ZeroRule(), EpsilonRule(1e-6), EpsilonRule(0.25)]


@pytest.mark.parametrize(
    "content,message",
    [
        ("composite = ", "not a valid TOML rules file"),
        ('[[rule]]\nlayers = 1\n', "needs a 'rule' key"),
        ('[[rule]]\nlayers = 1\ntype = "Conv"\nrule = "ZeroRule()"\n', "give one of"),
        ('colour = "red"\n', "unknown keys"),
        ('[[rule]]\nrule = "EpsilonRule(epsilon=)"\n', "malformed"),
    ],
)
def test_bad_rules_files(tmp_path, content, message):
    path = tmp_path / "rules.toml"
    path.write_text(content)
    with pytest.raises(CompositeSyntaxError, match=message):
        load_rules_file(path)


def test_layer_map_that_matches_nothing_is_an_error():
    for index in (99, "/no/such/node", "/nothing/*"):
        with pytest.raises(IncompatibleRuleError, match="matches no layer; the model has 7 layers"):
            lrpc.lrp_rules(MODEL, Composite(LayerMap(index, EpsilonRule())))


def test_rules_file_with_rule_as_a_plain_key(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('rule = "FlatRule()"\n')
    with pytest.raises(CompositeSyntaxError, match=r"'rule' must be a list of \[\[rule\]\] tables"):
        load_rules_file(path)


def test_hierarchical_indices_from_module_paths():
    layers = [layer for layer, _ in lrpc.lrp_rules(MODEL, Composite())]
    assert [layer.path_index for layer in layers] == [(0, 0), (0, 1), (0, 2), (1,), (2,), (3, 0), (3, 1)]
    got = rules_of(Composite(LayerMap((0, 2), GammaRule()), LayerMap([3, 1], EpsilonRule())))
    assert got == [ZeroRule(), ZeroRule(), GammaRule()] + [ZeroRule()] * 3 + [EpsilonRule()]


def test_show_layer_indices_prints_and_returns(capsys):
    indices = lrpc.show_layer_indices(MODEL)
    printed = capsys.readouterr().out
    assert [(i.index, i.path, i.op_type) for i in indices][:2] == [(0, (0, 0), "Conv"), (1, (0, 1), "MaxPool")]
    assert "/classifier/classifier.2/Gemm" in printed and "(3, 1)" in printed
