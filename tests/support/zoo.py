"""Small seeded torch models (ReLU networks, eval mode, float32) and matching inputs.

Every model is built inside a forked RNG so that building one does not disturb the global torch
random state, and all parameters (and BatchNorm statistics) are drawn from a ``torch.Generator``
seeded with ``seed``. Weights use He-normal scaling so activations stay O(1) through the network,
biases are small but non-zero.

Module names (``model.named_modules()``) are stable and readable, e.g. ``conv1``, ``fc2`` or
``layer2.downsample.0``; tests use them to put a specific rule on a specific layer.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

MODEL_NAMES = ('lenet', 'vgg', 'vgg_avg', 'resnet', 'mlp', 'unet')

INPUT_SHAPES = {
    'lenet': (1, 16, 16),
    'vgg': (3, 16, 16),
    'vgg_avg': (3, 16, 16),
    'resnet': (3, 16, 16),
    'mlp': (20,),
    'unet': (3, 8, 8),
}

NUM_CLASSES = {'lenet': 10, 'vgg': 10, 'vgg_avg': 10, 'resnet': 10, 'mlp': 5, 'unet': 10}


# --------------------------------------------------------------------------------------------------
# parameter initialisation
# --------------------------------------------------------------------------------------------------

def init_parameters(model: nn.Module, seed: int) -> nn.Module:
    """He-normal weights, small biases and non-trivial BatchNorm statistics, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(torch.rand(shape, generator=gen) + 0.5)            # [0.5, 1.5)
                module.bias.copy_(torch.randn(shape, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(shape, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(shape, generator=gen) * 1.5 + 0.5)  # [0.5, 2.0)
    return model.float().eval()


def _build(factory, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        model = factory()
    return init_parameters(model, seed)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------

def mlp(seed: int = 0) -> nn.Module:
    """Input ``[N, 20]``: Linear(20,32)-ReLU-Linear(32,32)-ReLU-Linear(32,5)."""
    return _build(lambda: nn.Sequential(OrderedDict([
        ('fc1', nn.Linear(20, 32)),
        ('relu1', nn.ReLU()),
        ('fc2', nn.Linear(32, 32)),
        ('relu2', nn.ReLU()),
        ('fc3', nn.Linear(32, 5)),
    ])), seed)


def lenet(seed: int = 0) -> nn.Module:
    """Input ``[N, 1, 16, 16]``: LeNet-style conv/max-pool network with three dense layers."""
    return _build(lambda: nn.Sequential(OrderedDict([
        ('conv1', nn.Conv2d(1, 6, 5, padding=2)),     # 16x16
        ('relu1', nn.ReLU()),
        ('pool1', nn.MaxPool2d(2)),                   # 8x8
        ('conv2', nn.Conv2d(6, 16, 5)),               # 4x4
        ('relu2', nn.ReLU()),
        ('pool2', nn.MaxPool2d(2)),                   # 2x2
        ('flatten', nn.Flatten()),
        ('fc1', nn.Linear(16 * 2 * 2, 120)),
        ('relu3', nn.ReLU()),
        ('fc2', nn.Linear(120, 84)),
        ('relu4', nn.ReLU()),
        ('fc3', nn.Linear(84, 10)),
    ])), seed)


def vgg(seed: int = 0, pool: str = 'max') -> nn.Module:
    """Input ``[N, 3, 16, 16]``: two VGG blocks (8 and 16 channels) and a two-layer classifier.

    ``pool='avg'`` uses ``AvgPool2d(2)`` instead of ``MaxPool2d(2)``.
    """
    if pool not in ('max', 'avg'):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")

    def make_pool():
        return nn.MaxPool2d(2) if pool == 'max' else nn.AvgPool2d(2)

    return _build(lambda: nn.Sequential(OrderedDict([
        ('conv1_1', nn.Conv2d(3, 8, 3, padding=1)),
        ('relu1_1', nn.ReLU()),
        ('conv1_2', nn.Conv2d(8, 8, 3, padding=1)),
        ('relu1_2', nn.ReLU()),
        ('pool1', make_pool()),                        # 8x8
        ('conv2_1', nn.Conv2d(8, 16, 3, padding=1)),
        ('relu2_1', nn.ReLU()),
        ('conv2_2', nn.Conv2d(16, 16, 3, padding=1)),
        ('relu2_2', nn.ReLU()),
        ('pool2', make_pool()),                        # 4x4
        ('flatten', nn.Flatten()),
        ('fc1', nn.Linear(16 * 4 * 4, 32)),
        ('relu_fc1', nn.ReLU()),
        ('dropout', nn.Dropout(0.5)),
        ('fc2', nn.Linear(32, 10)),
    ])), seed)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN (+ identity or 1x1 conv-BN shortcut), add, ReLU.

    The residual addition is a plain ``a + b`` unless ``zennit_sum`` is set (see
    :func:`set_zennit_sum`), in which case it is ``zennit.layer.Sum()(torch.stack([a, b], -1))`` so
    that Zennit can attach its ``Norm`` rule to it. Both compute the same values.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(OrderedDict([
                ('0', nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)),
                ('1', nn.BatchNorm2d(out_channels)),
            ]))
        else:
            self.downsample = None
        # placeholder for zennit.layer.Sum, registered here to keep the module order = forward order
        self.register_module('sum', None)
        self.relu2 = nn.ReLU()
        self.zennit_sum = False

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.zennit_sum:
            out = self.sum(torch.stack([out, shortcut], dim=-1))
        else:
            out = out + shortcut
        return self.relu2(out)


class ResNet(nn.Module):
    """Input ``[N, 3, 16, 16]``: stem conv-BN-ReLU, two basic blocks (8->8, 8->16 stride 2), GAP, fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8, stride=1)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet(seed: int = 0) -> nn.Module:
    """Input ``[N, 3, 16, 16]``: tiny ResNet with BatchNorm and two residual blocks."""
    return _build(ResNet, seed)


class UNet(nn.Module):
    """Input ``[N, 3, 8, 8]``: a one-level U-Net (segmentation necks' bilinear upsampling,
    the skip concatenated) with a classification head."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bottom = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False)
        self.merge = nn.Conv2d(12, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        skip = self.relu(self.down(x))
        deep = self.up(self.relu(self.bottom(self.pool(skip))))
        return self.fc(self.flatten(self.relu(self.merge(torch.cat([deep, skip], 1)))))


def unet(seed: int = 0) -> nn.Module:
    return _build(UNet, seed)


def set_zennit_sum(model: nn.Module, on: bool) -> nn.Module:
    """Switch every residual addition of ``model`` between ``a + b`` (off) and ``zennit.layer.Sum`` (on).

    Returns ``model`` (modified in place). The weights are unaffected.
    """
    blocks = [module for module in model.modules() if isinstance(module, BasicBlock)]
    if on and blocks:
        from .zennit_ref import import_zennit
        zennit = import_zennit()
    for block in blocks:
        block.zennit_sum = bool(on)
        if on and block.sum is None:
            block.sum = zennit.layer.Sum(dim=-1)
    return model


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_FACTORIES = {
    'lenet': lenet,
    'vgg': vgg,
    'vgg_avg': lambda seed=0: vgg(seed, pool='avg'),
    'resnet': resnet,
    'mlp': mlp,
    'unet': unet,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Build a zoo model by name (one of :data:`MODEL_NAMES`)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f'unknown zoo model {name!r}; known: {", ".join(MODEL_NAMES)}') from None
    return factory(seed)


def example_input(name: str, n: int = 1, seed: int = 0) -> np.ndarray:
    """A float32 batch ``[n, *INPUT_SHAPES[name]]`` with entries drawn from N(0, 1)."""
    shape = INPUT_SHAPES[name]
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def zero_biases(model: nn.Module) -> nn.Module:
    """Set every bias to zero, in place, for conservation tests; returns ``model``.

    Conv/Linear biases become zero; BatchNorm layers get ``running_mean = 0`` and ``bias = 0``, so the
    BatchNorm affine map (and thus the bias of a conv with the BatchNorm fused in) is bias-free.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
    return model


def parametric_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear modules of ``model`` in registration (= forward) order."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def forward_numpy(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run ``model`` on a numpy batch without gradients; returns the logits as numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
