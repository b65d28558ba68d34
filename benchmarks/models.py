"""Benchmark models: ResNet-50, VGG-16 and MobileNetV2 layouts built in plain torch.

There is no usable torchvision here, so the three ImageNet classifiers are written out with the
standard layouts (1000 classes, 224x224 inputs):

* ``resnet50``: 7x7/2 stem conv-BN-ReLU + 3x3/2 max-pool, bottleneck stages [3, 4, 6, 3]
  (widths 64..512, expansion 4, so 256..2048 channels), projection shortcuts, global average pool,
  fc 2048 -> 1000.
* ``vgg16``: 13 conv3x3-ReLU in five blocks (64, 128, 256, 512, 512), each followed by a 2x2 max-pool,
  then fc 25088 -> 4096 -> 4096 -> 1000 with ReLU and dropout.
* ``mobilenet_v2``: stem 3x3/2 conv (32), the 17 inverted residual blocks of the standard
  configuration (t, c, n, s), ReLU6, linear bottlenecks, residual adds, 1x1 conv to 1280, global
  average pool, dropout, fc 1280 -> 1000 (width multiplier 1.0).

Weights are random but seeded: He-normal for Conv/Linear, small non-zero biases, and non-trivial
BatchNorm statistics (gamma in [0.5, 1.5), beta ~ N(0, 0.2), mean ~ N(0, 0.3), var in [0.5, 2)).
All models are returned in eval mode.

Residual additions are an :class:`Add` module, so the same weights can be given to

* the ONNX exporter (``a + b``, an ``Add`` node),
* Zennit (:func:`for_zennit`: BatchNorm fused into the conv, ``Add`` -> ``zennit.layer.Sum`` on the
  stacked branches, which Zennit's composites map to its ``Norm`` rule),
* Captum (:func:`for_captum`: BatchNorm fused, ``Add`` -> Captum's ``Addition_Module``).

Module registration order equals forward order (BatchNorm fusion pairs each BatchNorm with the conv
registered just before it), every ReLU is its own module and none is in-place (Captum needs both).
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 1000
IMAGE_SHAPE = (3, 224, 224)
INPUT_NAME = 'input'
OUTPUT_NAME = 'logits'
OPSET = 17

MODEL_NAMES = ('resnet50', 'vgg16', 'mobilenet_v2', 'resnet18')

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')


def _support(name: str):
    """A module of the test suite's helpers (``tests/support/``), shared with the benchmarks."""
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    import importlib

    return importlib.import_module(f"support.{name}")


def zennit_ref():
    """The test suite's Zennit helper module (``tests/support/zennit_ref.py``): the torchvision stub,
    ``composite(name)`` mirroring lrpc's presets, ``fuse_batchnorm``."""
    return _support("zennit_ref")


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------

class Add(nn.Module):
    """``a + b`` as a module, so that attribution frameworks can put a rule on the residual sum."""

    def forward(self, a, b):
        return a + b


class ZennitAdd(nn.Module):
    """``zennit.layer.Sum`` of the stacked branches (the same values as ``a + b``)."""

    def __init__(self):
        super().__init__()
        zennit = zennit_ref().import_zennit()
        self.sum = zennit.layer.Sum(dim=-1)

    def forward(self, a, b):
        return self.sum(torch.stack([a, b], dim=-1))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride), 1x1 expand (x4), BatchNorm after each conv, projection shortcut
    (1x1 conv-BN) where the shape changes, residual add, ReLU (torchvision's ResNet v1.5 layout)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ('0', nn.Conv2d(inplanes, out, 1, stride, bias=False)),
                ('1', nn.BatchNorm2d(out)),
            ]))
        else:
            self.downsample = None
        self.add = Add()
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(self.add(out, identity))


class BasicBlock(nn.Module):
    """3x3 (stride), 3x3, BatchNorm after each conv, projection shortcut where the shape changes,
    residual add, ReLU (torchvision's ResNet-18/34 block)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(OrderedDict([
                ('0', nn.Conv2d(inplanes, planes, 1, stride, bias=False)),
                ('1', nn.BatchNorm2d(planes)),
            ]))
        else:
            self.downsample = None
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.add(out, identity))


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7x7/2 stem, 3x3/2 max-pool, four stages (64..512 planes),
    global average pool, fc."""

    def __init__(self, block=None, layers=(3, 4, 6, 3), num_classes: int = NUM_CLASSES):
        super().__init__()
        block = block or Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        stages = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            stage = []
            for number in range(blocks):
                stage.append(block(inplanes, planes, stride if number == 0 else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ResNet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


def ResNet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


VGG16_CONFIG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG16(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers = []
        channels = 3
        for item in VGG16_CONFIG:
            if item == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        # 224x224 inputs give 7x7 maps: torchvision's AdaptiveAvgPool2d((7, 7)) is the identity there
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        layers = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == oup
        self.add = Add() if self.use_res_connect else None

    def forward(self, x):
        out = self.conv(x)
        return self.add(x, out) if self.use_res_connect else out


MOBILENET_V2_CONFIG = (  # expansion t, channels c, repeats n, stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        channels, last = 32, 1280
        features = [_conv_bn_relu6(3, channels, 3, 2)]
        for t, c, n, s in MOBILENET_V2_CONFIG:
            for index in range(n):
                features.append(InvertedResidual(channels, c, s if index == 0 else 1, t))
                channels = c
        features.append(_conv_bn_relu6(channels, last, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


_FACTORIES = {'resnet50': ResNet50, 'vgg16': VGG16, 'mobilenet_v2': MobileNetV2, 'resnet18': ResNet18}


# --------------------------------------------------------------------------------------------------
# weights, inputs, variants
# --------------------------------------------------------------------------------------------------



def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` (one of :data:`MODEL_NAMES`) with seeded random weights, in eval mode."""
    if name not in _FACTORIES:
        raise ValueError(f'unknown model {name!r}; known: {", ".join(MODEL_NAMES)}')
    with torch.random.fork_rng(devices=[]):
        model = _FACTORIES[name]()
    # the test zoo's initialisation: He-normal weights, non-trivial BatchNorm statistics
    return _support("zoo").init_parameters(model, seed)


def example_input(batch: int, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal batch ``[batch, 3, 224, 224]`` (float32)."""
    return np.random.default_rng(seed).standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)


def _replace(model: nn.Module, kind: type, factory) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, factory())
    return model


def for_zennit(model: nn.Module) -> nn.Module:
    """Copy of ``model`` as Zennit sees it: BatchNorm fused into the conv before it (float64 fusion,
    BatchNorm -> Identity), residual ``Add`` -> ``zennit.layer.Sum``."""
    fused = zennit_ref().fuse_batchnorm(model)
    return _replace(fused, Add, ZennitAdd).float().eval()


def for_captum(model: nn.Module) -> nn.Module:
    """Copy of ``model`` for Captum's LRP: BatchNorm fused (-> Identity), ``Add`` -> ``Addition_Module``."""
    from captum.attr._utils.custom_modules import Addition_Module

    fused = zennit_ref().fuse_batchnorm(model)
    return _replace(fused, Add, Addition_Module).float().eval()


# --------------------------------------------------------------------------------------------------
# ONNX export (cached)
# --------------------------------------------------------------------------------------------------

def export(model: nn.Module, path: str) -> str:
    """Export ``model`` with the legacy (TorchScript) exporter, opset 17, dynamic batch, to ``path``."""
    import contextlib
    import io
    import warnings

    example = torch.from_numpy(example_input(1))
    tmp = f'{path}.tmp'
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter('ignore')
        torch.onnx.export(
            model.eval(), (example,), tmp,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}},
            do_constant_folding=True,
        )
    os.replace(tmp, path)
    return path


def onnx_path(name: str, cache_dir: str, seed: int = 0) -> str:
    """Path of the cached ONNX export of ``build(name, seed)``; exported on first use.

    The cache key holds the torch version and a hash of this file, so a different exporter or
    changed model code re-exports."""
    os.makedirs(cache_dir, exist_ok=True)
    import hashlib

    tag = torch.__version__.split('+')[0]
    with open(__file__, 'rb') as handle:          # a change to the model code re-exports
        code = hashlib.sha256(handle.read()).hexdigest()[:8]
    path = os.path.join(cache_dir, f'{name}-seed{seed}-torch{tag}-opset{OPSET}-{code}.onnx')
    if not os.path.exists(path):
        export(build(name, seed), path)
    return path


__all__ = [
    'IMAGE_SHAPE',
    'INPUT_NAME',
    'MODEL_NAMES',
    'NUM_CLASSES',
    'OUTPUT_NAME',
    'Add',
    'build',
    'example_input',
    'export',
    'for_captum',
    'for_zennit',
    'onnx_path',
    'zennit_ref',
]
