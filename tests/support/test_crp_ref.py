"""Self-checks of the Zennit CRP reference (support/crp_ref.py)."""
import numpy as np
import pytest
from torch import nn

from support import crp_ref, zoo
from support.zennit_ref import (
    Convolution,
    Epsilon,
    composite,
    layer_map_base,
    zennit,
    zennit_relevance,
)

# (zennit is imported through zennit_ref, which stubs the torchvision it imports)
LayerMapComposite = zennit.composites.LayerMapComposite

# (zoo model, CRP module, channels at its output)
CASES = [('lenet', 'conv2', 16), ('mlp', 'fc2', 32)]
N = 3


def epsilon_composite(epsilon=1e-9):
    """Epsilon on every Conv/Linear, Zennit's base map elsewhere (Pass on activations)."""
    return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, Epsilon(epsilon)),
                                                           (nn.Linear, Epsilon(epsilon))])


def _rel_close(actual, expected, rtol):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize('name, module, channels', CASES)
@pytest.mark.parametrize('preset', ['EpsilonPlusFlat', 'EpsilonAlpha2Beta1', 'EpsilonPlus'])
@pytest.mark.parametrize('normalize, target', [(True, None), (False, [0, 3, 1])])
def test_all_features_sum_to_lrp(name, module, channels, preset, normalize, target):
    """(1) CRP decomposes LRP: summing over all channels gives the plain Zennit relevance."""
    model = zoo.build(name, seed=0)
    x = zoo.example_input(name, N, seed=1)
    comp = composite(preset)
    result = crp_ref.crp(model, x, target, comp, module, ('indexed', range(channels)),
                         normalize=normalize)
    assert result.relevance.shape == (channels * N, *x.shape[1:])
    assert result.relevance.dtype == np.float64
    assert result.indices.shape == (channels, N)
    np.testing.assert_array_equal(result.indices, np.repeat(np.arange(channels)[:, None], N, axis=1))
    if target is not None:
        np.testing.assert_array_equal(result.targets, target)
    plain = zennit_relevance(model, x, target, composite(preset), normalize=normalize, double=True)
    summed = crp_ref.split_features(result.relevance, N).sum(axis=0)
    for i in range(N):
        _rel_close(summed[i], plain[i], 1e-6)
    # a feature's relevance is not the whole LRP relevance (the mask really acts)
    assert np.abs(result.relevance[:N] - plain).max() > 1e-3 * np.abs(plain).max()


@pytest.mark.parametrize('name, module, channels', CASES)
def test_feature_conserves_its_layer_relevance(name, module, channels):
    """(2) bias-free model, Epsilon rules: feature k's input relevance sums to channel k's layer sum.

    Epsilon leaks R_j * eps / z_j per neuron; with eps = 1e-6 that reaches 2e-5 (relative) for an
    mlp fc1 neuron with small z, so the check uses eps = 1e-9.
    """
    model = zoo.zero_biases(zoo.build(name, seed=0))
    x = zoo.example_input(name, N, seed=2)
    result = crp_ref.crp(model, x, None, epsilon_composite(), module, ('indexed', range(channels)))
    scores = crp_ref.channel_scores(result.layer_relevance)                        # [N, C]
    per_feature = crp_ref.split_features(result.relevance, N).reshape(channels, N, -1).sum(axis=2)
    np.testing.assert_allclose(per_feature, scores.T, rtol=1e-6, atol=1e-9 * np.abs(scores).max())
    # and the layer relevance itself is conserved from the output (one-hot seed sums to 1)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    assert np.abs(scores).max() > 1e-3


@pytest.mark.parametrize('name, module, channels', CASES)
@pytest.mark.parametrize('n', [1, 3, 5])
def test_top_n_sorted_by_layer_relevance(name, module, channels, n):
    """(3) top-n picks the channels of largest spatially summed layer relevance, descending."""
    model = zoo.build(name, seed=0)
    x = zoo.example_input(name, N, seed=3)
    comp = composite('EpsilonPlusFlat')
    relevance, indices = crp_ref.crp_relevance(model, x, None, comp, module, ('top', n),
                                               return_indices=True)
    assert relevance.shape == (n * N, *x.shape[1:]) and indices.shape == (n, N)
    layer = crp_ref.layer_relevance(model, x, None, comp, module)
    assert layer.shape[:2] == (N, channels)
    assert layer.ndim == (4 if name == 'lenet' else 2)
    scores = layer.reshape(N, channels, -1).sum(axis=2)
    np.testing.assert_array_equal(indices, np.argsort(-scores, axis=1, kind='stable')[:, :n].T)
    picked = scores[np.arange(N), indices]                                  # [n, N]
    assert np.all(np.diff(picked, axis=0) <= 0)
    for i in range(N):   # nothing left out is larger than the last pick
        rest = np.delete(scores[i], indices[:, i])
        assert rest.size == 0 or rest.max() <= picked[-1, i]
    np.testing.assert_array_equal(
        indices, crp_ref.feature_indices(model, x, None, comp, module, ('top', n)))


@pytest.mark.parametrize('name, module, channels', CASES)
def test_ordering_features_then_inputs(name, module, channels):
    """(4) rows k*N:(k+1)*N are feature k; each row equals a single-input, single-channel run."""
    model = zoo.build(name, seed=0)
    x = zoo.example_input(name, N, seed=4)
    comp = composite('EpsilonPlusFlat')
    n = 3
    relevance, indices = crp_ref.crp_relevance(model, x, None, comp, module, ('top', n),
                                               return_indices=True)
    assert len(np.unique(indices[0])) > 1 or len(np.unique(indices[1])) > 1  # inputs pick differently
    for k in range(n):
        for i in range(N):
            single = crp_ref.crp_relevance(model, x[i:i + 1], None, comp, module,
                                           ('indexed', [int(indices[k, i])]))
            assert single.shape == (1, *x.shape[1:])
            _rel_close(relevance[k * N + i], single[0], 1e-9)
    # indexed features: block k is the channel idx[k] for every input
    chosen = [channels - 1, 0, 2]
    relevance = crp_ref.crp_relevance(model, x, None, comp, module, ('indexed', chosen))
    blocks = crp_ref.split_features(relevance, N)
    for k, channel in enumerate(chosen):
        np.testing.assert_array_equal(relevance[k * N:(k + 1) * N], blocks[k])
        alone = crp_ref.crp_relevance(model, x, None, comp, module, ('indexed', [channel]))
        _rel_close(blocks[k], alone, 1e-12)


def test_float32_and_errors():
    model = zoo.lenet(seed=0)
    x = zoo.example_input('lenet', 2, seed=5)
    comp = composite('EpsilonPlusFlat')
    r32 = crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('top', 2), double=False)
    r64 = crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('top', 2))
    assert r32.dtype == np.float32 and r32.shape == r64.shape == (4, 1, 16, 16)
    _rel_close(r32, r64, 1e-4)
    assert crp_ref.num_features(crp_ref.top_features(4)) == 4
    assert crp_ref.indexed_features(1, 2) == crp_ref.indexed_features([1, 2]) == ('indexed', [1, 2])
    with pytest.raises(ValueError):
        crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('top', 17))
    with pytest.raises(ValueError):
        crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('indexed', [16]))
    with pytest.raises(ValueError):
        crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('indexed', [-1]))
    with pytest.raises(ValueError):
        crp_ref.crp_relevance(model, x, None, comp, 'conv2', ('bottom', 2))
    with pytest.raises(KeyError):
        crp_ref.crp_relevance(model, x, None, comp, 'conv9', ('top', 1))
