"""Reference LRP relevances computed with Zennit.

Recipe: the model is deep-copied, every BatchNorm2d is fused into the preceding Conv2d (and
replaced by ``nn.Identity``), residual additions are switched to ``zennit.layer.Sum`` so that Zennit
attaches its ``Norm`` rule to them, and Zennit's ``Gradient`` attributor is run with a composite
whose output relevance is one-hot(target) (``normalize=True``) or one-hot(target) * logit
(``normalize=False``).

The composites of :func:`composite` mirror lrpc's presets:

=========================  ==================  =====================  ==============
preset                     first Conv layer    other Conv layers      Linear layers
=========================  ==================  =====================  ==============
EpsilonPlus                ZPlus               ZPlus                  Epsilon(1e-6)
EpsilonPlusFlat            Flat                ZPlus                  Epsilon(1e-6)
EpsilonAlpha2Beta1         AlphaBeta(2, 1)     AlphaBeta(2, 1)        Epsilon(1e-6)
EpsilonAlpha2Beta1Flat     Flat                AlphaBeta(2, 1)        Epsilon(1e-6)
EpsilonGammaBox            ZBox(low, high)     OriginalGamma(0.25)    Epsilon(1e-6)
=========================  ==================  =====================  ==============

"First Conv layer" means: the first layer with parameters (Conv or Linear, in module order), and
only if it is a convolution (unlike Zennit's own ``*Flat`` presets, which also put Flat on a first
Linear layer). Everywhere: activations -> Pass, residual Sum -> Norm, AvgPool/AdaptiveAvgPool ->
Norm (Zennit's ``layer_map_base``); MaxPool, Flatten, Dropout, Identity -> plain gradient. All
stabilizers are 1e-6.
"""
from __future__ import annotations

import copy
import importlib.machinery
import sys
import types

import numpy as np
import torch
from torch import nn

from . import zoo

PRESETS = ('EpsilonPlus', 'EpsilonPlusFlat', 'EpsilonAlpha2Beta1', 'EpsilonAlpha2Beta1Flat', 'EpsilonGammaBox')


def _install_torchvision_stub() -> dict:
    """Register an empty ``torchvision`` package (Zennit imports it, the real one does not import here);
    returns the stub modules (empty when a torchvision is already imported)."""
    if 'torchvision' in sys.modules:
        return {}
    modules = {}
    for name in ('torchvision', 'torchvision.models', 'torchvision.models.resnet'):
        module = types.ModuleType(name)
        # a spec keeps importlib.util.find_spec('torchvision') (used by torch.onnx) from raising
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        modules[name] = module
    resnet = modules['torchvision.models.resnet']
    resnet.Bottleneck = type('Bottleneck', (nn.Module,), {})
    resnet.BasicBlock = type('BasicBlock', (nn.Module,), {})
    modules['torchvision'].models = modules['torchvision.models']
    modules['torchvision.models'].resnet = resnet
    sys.modules.update(modules)
    return modules


def import_zennit():
    """Import and return the ``zennit`` package, with a ``torchvision`` stub during the import only.

    The stub leaves ``sys.modules`` afterwards: Zennit keeps the classes it imported, and other
    packages (transformers) must not mistake the stub for an installed torchvision.
    """
    try:
        import torchvision  # noqa: F401
        stub = {}
    except Exception:  # absent, or the CUDA build that fails beside the CPU torch
        for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
            del sys.modules[name]
        stub = _install_torchvision_stub()
    try:
        import zennit
        import zennit.attribution
        import zennit.composites
        import zennit.core
        import zennit.layer
        import zennit.rules
        import zennit.types
    finally:
        for name, module in stub.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return zennit


zennit = import_zennit()

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import NameLayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base  # noqa: E402
from zennit.core import BasicHook, Stabilizer  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Flat, GammaMod, ZBox, ZPlus  # noqa: E402
from zennit.types import Convolution  # noqa: E402


# --------------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------------

class OriginalGamma(BasicHook):
    """Original LRP-gamma: a single term with weights ``W + gamma W+`` and bias ``b + gamma b+``.

    ``R_in = x * ((W + gamma W+)^T (R_out / stab(z)))`` with ``z = x (W + gamma W+) + b + gamma b+``
    and the input left unmodified. (``zennit.rules.Gamma`` is the *generalized* gamma rule, which
    splits positive and negative inputs and outputs; it equals this rule only for non-negative inputs
    and positive outputs.)
    """

    def __init__(self, gamma: float = 0.25, stabilizer=1e-6, zero_params=None):
        stabilizer_fn = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda input: input],
            param_modifiers=[GammaMod(gamma, min=0., zero_params=zero_params)],
            output_modifiers=[lambda output: output],
            gradient_mapper=(lambda out_grad, outputs: out_grad / stabilizer_fn(outputs[0])),
            reducer=(lambda inputs, gradients: inputs[0] * gradients[0]),
        )


def _as_tensor(value):
    if isinstance(value, (int, float)):
        return float(value)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


# lrpc leaves layers no preset names (residual Add, average pooling) on its default ZeroRule,
# whose stabilizer is 1e-9; Zennit's Norm on Sum and AvgPool gets the same value here.
ZERO_RULE_STABILIZER = 1e-9


def composite(name: str, *, low=None, high=None, epsilon: float = 1e-6, stabilizer: float = 1e-6,
              gamma: float = 0.25, norm_stabilizer: float = ZERO_RULE_STABILIZER):
    """Zennit composite mirroring the lrpc preset ``name`` (one of :data:`PRESETS`).

    ``low``/``high`` (required for ``EpsilonGammaBox``) are floats or arrays broadcastable to the
    input, e.g. per channel ``[1, C, 1, 1]``.
    """
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')

    dense = Epsilon(epsilon=epsilon)
    if name in ('EpsilonPlus', 'EpsilonPlusFlat'):
        conv = ZPlus(stabilizer=stabilizer)
    elif name in ('EpsilonAlpha2Beta1', 'EpsilonAlpha2Beta1Flat'):
        conv = AlphaBeta(alpha=2., beta=1., stabilizer=stabilizer)
    else:
        conv = OriginalGamma(gamma=gamma, stabilizer=stabilizer)

    if name.endswith('Flat'):
        first_conv = Flat(stabilizer=stabilizer)
    elif name == 'EpsilonGammaBox':
        if low is None or high is None:
            raise ValueError('EpsilonGammaBox needs low and high')
        first_conv = ZBox(low=_as_tensor(low), high=_as_tensor(high), stabilizer=stabilizer)
    else:
        first_conv = conv

    layer_map = layer_map_base(norm_stabilizer) + [(Convolution, conv), (nn.Linear, dense)]
    # the first parametric layer ends the "first layer" search whether it is a Conv or a Linear;
    # only a Conv gets the special rule
    first_map = [(Convolution, first_conv), (nn.Linear, dense)]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map)


# --------------------------------------------------------------------------------------------------
# model preparation
# --------------------------------------------------------------------------------------------------

def _leaf_parents(module: nn.Module):
    """Yield ``(parent, attribute name, leaf)`` for every leaf module in registration order."""
    for name, child in module.named_children():
        if next(child.children(), None) is None:
            yield module, name, child
        else:
            yield from _leaf_parents(child)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with every BatchNorm2d fused into the Conv2d registered right before it.

    The BatchNorm modules are replaced by ``nn.Identity`` (so module names are kept). The fusion is
    computed in float64. Raises if a BatchNorm does not directly follow a convolution (in module
    registration order, which the zoo models keep equal to the forward order).
    """
    fused = copy.deepcopy(model).eval()
    previous = None
    for parent, name, leaf in list(_leaf_parents(fused)):
        if isinstance(leaf, nn.BatchNorm2d):
            if not isinstance(previous, nn.Conv2d):
                raise ValueError(f'BatchNorm {name!r} does not follow a Conv2d')
            _fuse_into(previous, leaf)
            setattr(parent, name, nn.Identity())
        previous = leaf
    return fused


@torch.no_grad()
def _fuse_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    conv.weight = nn.Parameter(weight.to(dtype))
    conv.bias = nn.Parameter(bias.to(dtype))


def prepare(model: nn.Module, double: bool = False) -> nn.Module:
    """The model Zennit sees: BatchNorm fused, residual additions as ``zennit.layer.Sum``, eval mode."""
    ref = zoo.set_zennit_sum(fuse_batchnorm(model), True).eval()
    return ref.double() if double else ref.float()


# --------------------------------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------------------------------

def _output_relevance(logits: torch.Tensor, target, normalize: bool) -> torch.Tensor:
    n, classes = logits.shape
    if target is None:
        index = logits.argmax(dim=1)
    else:
        index = torch.as_tensor(np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy())
    relevance = nn.functional.one_hot(index, classes).to(logits.dtype)
    return relevance if normalize else relevance * logits


def _attribute(ref: nn.Module, x: np.ndarray, target, comp, normalize: bool) -> np.ndarray:
    dtype = next(ref.parameters()).dtype
    inputs = torch.as_tensor(np.array(x, dtype=np.float32)).to(dtype)
    with torch.no_grad():
        logits = ref(inputs)
    grad_output = _output_relevance(logits, target, normalize)
    with Gradient(model=ref, composite=comp) as attributor:
        _, relevance = attributor(inputs, grad_output)
    return relevance.detach().cpu().numpy()


def zennit_relevance(model: nn.Module, x: np.ndarray, target, composite, normalize: bool = True,
                     double: bool = False) -> np.ndarray:
    """Input relevance of ``model`` for batch ``x`` according to Zennit with ``composite``.

    ``target``: ``None`` (arg-max per sample), an int, or one class index per sample. The output
    relevance is one-hot(target), times the target logit when ``normalize=False``. ``double=True``
    runs the reference in float64. Returns an array shaped like ``x`` (float32, or float64 if
    ``double``).
    """
    return _attribute(prepare(model, double), x, target, composite, normalize)


def name_map_relevance(model: nn.Module, x: np.ndarray, target, rules: dict, default=None,
                       normalize: bool = True, double: bool = False) -> np.ndarray:
    """Like :func:`zennit_relevance`, with one Zennit rule per module name.

    ``rules`` maps module names (``model.named_modules()``; BatchNorm modules are ``nn.Identity``
    after fusion) to Zennit rules, e.g. ``{'conv1': zennit.rules.WSquare(), 'fc2': zennit.rules.Epsilon(1e-9)}``.
    Unmapped modules get: activations -> Pass, Sum -> Norm, AvgPool -> Norm, Conv/Linear -> ``default``
    if given, else the plain gradient.
    """
    ref = prepare(model, double)
    known = {name for name, _ in ref.named_modules()}
    unknown = sorted(set(rules) - known)
    if unknown:
        raise KeyError(f'no modules named {unknown}; known: {sorted(known)}')
    name_map = [((name,), rule) for name, rule in rules.items()]
    layer_map = layer_map_base(ZERO_RULE_STABILIZER)
    if default is not None:
        layer_map = layer_map + [((Convolution, nn.Linear), default)]
    comp = NameLayerMapComposite(name_map=name_map, layer_map=layer_map)
    return _attribute(ref, x, target, comp, normalize)


def assigned_rules(model: nn.Module, comp) -> dict[str, str]:
    """``{module name: rule class name}`` that ``comp`` assigns on the prepared (BN-fused) ``model``."""
    ref = prepare(model)
    ctx: dict = {}
    assigned = {}
    for name, module in ref.named_modules():
        template = comp.module_map(ctx, name, module)
        if template is not None:
            assigned[name] = type(template).__name__
    return assigned


__all__ = [
    'PRESETS', 'OriginalGamma', 'assigned_rules', 'composite', 'fuse_batchnorm', 'import_zennit',
    'name_map_relevance', 'prepare', 'zennit_relevance',
]
