"""Tests of the reference infrastructure itself (zoo, export, Zennit references)."""
import numpy as np
import pytest

from support import selfcheck, zoo
from support.zennit_ref import PRESETS, assigned_rules, composite, zennit_relevance


def test_prepared_models_keep_function():
    selfcheck.check_reference_models()


def test_mlp_zennit_matches_numpy_lrp():
    selfcheck.check_mlp_lrp()


@pytest.mark.parametrize('name', ['lenet', 'vgg', 'vgg_avg'])
@pytest.mark.parametrize('preset', PRESETS)
def test_presets_conserve_without_bias(name, preset):
    kwargs = dict(low=-3.0, high=3.0) if preset == 'EpsilonGammaBox' else {}
    model = zoo.zero_biases(zoo.build(name, seed=0))
    x = zoo.example_input(name, 2, seed=1)
    relevance = zennit_relevance(model, x, None, composite(preset, **kwargs))
    assert relevance.shape == x.shape
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(axis=1), 1.0, atol=1e-4)


def test_first_layer_rule_only_on_convolutions():
    flat = assigned_rules(zoo.resnet(0), composite('EpsilonPlusFlat'))
    assert flat['conv1'] == 'Flat' and flat['layer1.conv1'] == 'ZPlus' and flat['fc'] == 'Epsilon'
    assert flat['layer1.sum'] == 'Norm' and flat['avgpool'] == 'Norm' and flat['relu'] == 'Pass'
    box = assigned_rules(zoo.lenet(0), composite('EpsilonGammaBox', low=-3.0, high=3.0))
    assert box['conv1'] == 'ZBox' and box['conv2'] == 'OriginalGamma' and box['fc1'] == 'Epsilon'
    dense = assigned_rules(zoo.mlp(0), composite('EpsilonAlpha2Beta1Flat'))
    assert set(dense.values()) == {'Epsilon', 'Pass'}


@pytest.mark.parametrize('name', zoo.MODEL_NAMES)
def test_exports(tmp_path, name):
    summary = selfcheck.check_exports(str(tmp_path), names=[name])
    assert 'BatchNormalization' not in summary[name, 'legacy']
    assert 'BatchNormalization' not in summary[name, 'dynamo']
