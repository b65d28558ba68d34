"""Small seeded torch models of common CNN architecture families (random weights, eval mode).

Each family keeps the building blocks of the real architecture (LRN, bottlenecks, dense blocks,
inception branches, fire modules, channel split and shuffle, depthwise convolutions, Hardswish,
squeeze-and-excitation gating, nearest upsampling with skip concatenation) at realistic channel
widths (16 to 256) on a ``3x32x32`` input, and ends in a classification head, so every model maps
``[N, 3, 32, 32]`` to logits ``[N, 10]``.

The designs keep EpsilonPlus conservative once biases are zero (``zero_biases``), so that a
conservation failure points at the compiler, not at the rule: ZPlus loses the relevance of an
output that receives relevance but has no positive contribution. After a ReLU that cannot happen
(only positive outputs receive relevance); elsewhere it is likely when a layer has few, ReLU-sparse
inputs. So convolutions whose outputs are not followed by a ReLU (residual branches, 1x1
projections) have at least 32 input channels, and the depthwise convs (9 or 25 inputs) are
followed by a ReLU, which ShuffleNetV2 and the Hardswish blocks of MobileNetV3 do not have in the
original (see :class:`ShuffleUnit` and :class:`MobileNetV3`). Checked against Zennit on the same
weights (10 seeds): per-sample sums stay within 3e-4 of 1 (mostly within 1e-5).

Parameters are drawn as in :mod:`support.zoo` (He-normal weights, small non-zero biases, BatchNorm
with non-trivial running statistics), from a ``torch.Generator`` seeded with ``seed``; building a
model does not disturb the global torch random state. Module names are readable
(``layer1.0.conv3``, ``features.denseblock1.denselayer2.conv1``, ``dec1.conv2``...).
"""
from __future__ import annotations

import functools
import os
import tempfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import zoo
from .export import export_onnx

FAMILIES = ('alexnet', 'vgg', 'resnet50', 'densenet', 'inception', 'squeezenet', 'shufflenet_v2',
            'mobilenet_v2', 'mobilenet_v3', 'unet')

INPUT_SHAPE = (3, 32, 32)
INPUT_SHAPES = {name: INPUT_SHAPE for name in (*FAMILIES, 'resnet18')}
NUM_CLASSES = 10


def _conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=None, groups=1, act=nn.ReLU):
    """Conv (no bias) - BatchNorm - activation, as ``0``, ``1``, ``2`` of a Sequential."""
    if padding is None:
        padding = (kernel_size - 1) // 2
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# AlexNet (with the original local response normalization)
# --------------------------------------------------------------------------------------------------

class AlexNet(nn.Module):
    """The original AlexNet layout: conv-ReLU-LRN-overlapping max-pool twice, three 3x3 convs,
    max-pool, Dropout-Linear classifier. (torchvision's AlexNet drops LRN and adds an adaptive
    average pool; with LRN, the legacy exporter loses the static shapes that pool needs:
    ``F.local_response_norm`` reshapes by ``x.size()``.)"""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ('conv1', nn.Conv2d(3, 32, 5, padding=2)),                    # 32x32
            ('relu1', nn.ReLU(inplace=True)),
            ('lrn1', nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)),
            ('pool1', nn.MaxPool2d(3, 2)),                                # 15x15
            ('conv2', nn.Conv2d(32, 64, 5, padding=2)),
            ('relu2', nn.ReLU(inplace=True)),
            ('lrn2', nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)),
            ('pool2', nn.MaxPool2d(3, 2)),                                # 7x7
            ('conv3', nn.Conv2d(64, 96, 3, padding=1)),
            ('relu3', nn.ReLU(inplace=True)),
            ('conv4', nn.Conv2d(96, 64, 3, padding=1)),
            ('relu4', nn.ReLU(inplace=True)),
            ('conv5', nn.Conv2d(64, 64, 3, padding=1)),
            ('relu5', nn.ReLU(inplace=True)),
            ('pool5', nn.MaxPool2d(3, 2)),                                # 3x3
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ('dropout1', nn.Dropout(0.5)),
            ('fc1', nn.Linear(64 * 3 * 3, 128)),
            ('relu1', nn.ReLU(inplace=True)),
            ('dropout2', nn.Dropout(0.5)),
            ('fc2', nn.Linear(128, 128)),
            ('relu2', nn.ReLU(inplace=True)),
            ('fc3', nn.Linear(128, num_classes)),
        ]))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------------------------------
# VGG (VGG-bn layout, three stages)
# --------------------------------------------------------------------------------------------------

class VGG(nn.Module):
    """conv3x3-BN-ReLU stacks ``[32, 32, M, 64, 64, M, 128, 128, 128, M]``, adaptive average pool to
    2x2, two hidden Linear-ReLU-Dropout layers."""

    CONFIG = (32, 32, 'M', 64, 64, 'M', 128, 128, 128, 'M')

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        layers, channels = [], 3
        for value in self.CONFIG:
            if value == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, value, 3, padding=1), nn.BatchNorm2d(value), nn.ReLU(inplace=True)]
                channels = value
        self.features = nn.Sequential(*layers)                            # 4x4
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(128 * 2 * 2, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# ResNet-50-style bottlenecks
# --------------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (stride) - 1x1 expand (x4), BatchNorm after each, projection shortcut
    (1x1 conv-BN) where the shape changes, ``out += identity``, ReLU (torchvision's layout)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        else:
            self.downsample = None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """Stem conv-BN-ReLU and max-pool (16x16), layer1: two bottlenecks (32 -> 128), layer2: two
    bottlenecks (128 -> 256, stride 2, 8x8), global average pool, fc."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(32, 32), Bottleneck(128, 32))
        self.layer2 = nn.Sequential(Bottleneck(128, 64, stride=2), Bottleneck(256, 64))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BasicBlock(nn.Module):
    """3x3 (stride) - 3x3, BatchNorm after each, projection shortcut where the shape changes,
    ``out += identity``, ReLU (torchvision's ResNet-18/34 block)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18's layout at small width: 7x7/2 stem conv-BN-ReLU, 3x3/2 max-pool (8x8), four
    stages of two basic blocks (32, 64, 128, 256 channels; strides 1, 2, 2, 2), global average
    pool, fc. Not in :data:`FAMILIES` (the bottleneck ResNet covers the Zennit matrix); used
    where a ResNet-18-style export is asked for by name."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (32, 64, 128, 256)
        stages, inplanes = [], 32
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(inplanes, width, 1 if i == 0 else 2), BasicBlock(width, width)))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------
# DenseNet (dense blocks: pre-activation BN-ReLU-Conv, torch.cat of all previous features)
# --------------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, in_channels, growth_rate, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, in_channels, growth_rate, bn_size):
        super().__init__()
        for i in range(num_layers):
            self[f'denselayer{i + 1}'] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """conv0-norm0-relu0-pool0 (16x16), dense block (3 layers, growth 16), transition
    (BN-ReLU-1x1 conv-AvgPool, 8x8), dense block, norm5, ReLU, global average pool, Linear. The
    BatchNorms inside the blocks follow a Concat, so they stay standalone."""

    def __init__(self, num_classes=NUM_CLASSES, growth_rate=16, bn_size=2):
        super().__init__()
        features = OrderedDict([
            ('conv0', nn.Conv2d(3, 32, 3, padding=1, bias=False)),
            ('norm0', nn.BatchNorm2d(32)),
            ('relu0', nn.ReLU(inplace=True)),
            ('pool0', nn.MaxPool2d(3, 2, 1)),
        ])
        channels = 32
        features['denseblock1'] = DenseBlock(3, channels, growth_rate, bn_size)
        channels += 3 * growth_rate                                       # 80
        features['transition1'] = nn.Sequential(OrderedDict([
            ('norm', nn.BatchNorm2d(channels)),
            ('relu', nn.ReLU(inplace=True)),
            ('conv', nn.Conv2d(channels, channels // 2, 1, bias=False)),
            ('pool', nn.AvgPool2d(2, 2)),
        ]))
        channels //= 2                                                    # 40
        features['denseblock2'] = DenseBlock(3, channels, growth_rate, bn_size)
        channels += 3 * growth_rate                                       # 88
        features['norm5'] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(features)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# Inception (Concat of conv and pooling paths)
# --------------------------------------------------------------------------------------------------

def _basic_conv(in_channels, out_channels, kernel_size, stride=1, padding=0):
    """Inception's BasicConv2d: conv (no bias) - BN (eps 1e-3) - ReLU."""
    return nn.Sequential(OrderedDict([
        ('conv', nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)),
        ('bn', nn.BatchNorm2d(out_channels, eps=1e-3)),
        ('relu', nn.ReLU(inplace=True)),
    ]))


class InceptionA(nn.Module):
    """GoogLeNet module: 1x1 | 1x1-3x3 | 1x1-5x5 | maxpool3x3-1x1."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch1 = _basic_conv(in_channels, 16, 1)
        self.branch2 = nn.Sequential(_basic_conv(in_channels, 24, 1), _basic_conv(24, 32, 3, padding=1))
        self.branch3 = nn.Sequential(_basic_conv(in_channels, 16, 1), _basic_conv(16, 16, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _basic_conv(in_channels, 16, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)   # 80


class InceptionReduction(nn.Module):
    """Inception-v3 grid reduction: 3x3 stride 2 | 1x1-3x3-3x3 stride 2 | max-pool 3x3 stride 2 (the
    pooled input itself is a branch of the Concat)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = _basic_conv(in_channels, 48, 3, stride=2)
        self.branch3x3dbl_1 = _basic_conv(in_channels, 32, 1)
        self.branch3x3dbl_2 = _basic_conv(32, 48, 3, padding=1)
        self.branch3x3dbl_3 = _basic_conv(48, 48, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)          # 48 + 48 + in


class InceptionC(nn.Module):
    """Inception-v3-style module with factorized 1x3/3x1 convolutions and an average-pool branch."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch1x1 = _basic_conv(in_channels, 32, 1)
        self.branch3x3_1 = _basic_conv(in_channels, 32, 1)
        self.branch3x3_2a = _basic_conv(32, 32, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _basic_conv(32, 32, (3, 1), padding=(1, 0))
        self.branch_pool = _basic_conv(in_channels, 32, 1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_2b(self.branch3x3_2a(self.branch3x3_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch3x3, branch_pool], 1)            # 96


class Inception(nn.Module):
    """Stem conv and max-pool (16x16), InceptionA (80 ch), reduction (176 ch, 7x7), InceptionC
    (96 ch), global average pool, Dropout, fc."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = _basic_conv(3, 32, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2, 1)
        self.inception3a = InceptionA(32)
        self.reduction = InceptionReduction(80)
        self.inception4a = InceptionC(176)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.inception4a(self.reduction(self.inception3a(x)))
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return self.fc(x)


# --------------------------------------------------------------------------------------------------
# SqueezeNet (fire modules)
# --------------------------------------------------------------------------------------------------

class Fire(nn.Module):
    """squeeze 1x1-ReLU, then Concat of expand 1x1-ReLU and expand 3x3-ReLU."""

    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 layout: conv-ReLU, ceil-mode max-pools, four fire modules, and its
    convolutional classifier (Dropout, 1x1 conv to the classes, ReLU, global average pool)."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),                               # 32x32
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),                           # 16x16
            Fire(32, 16, 32, 32),
            Fire(64, 16, 32, 32),
            nn.MaxPool2d(3, 2, ceil_mode=True),                           # 8x8
            Fire(64, 24, 48, 48),
            Fire(96, 24, 48, 48),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(96, num_classes, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------------------------------
# ShuffleNetV2 (channel split by chunk, channel shuffle by view-transpose-view)
# --------------------------------------------------------------------------------------------------

def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (torchvision's ``InvertedResidual``). Stride 1: ``x1, x2 = x.chunk(2, 1)``,
    Concat of x1 and branch2(x2); stride 2: Concat of branch1(x) and branch2(x). Then channel
    shuffle with 2 groups. branch2: 1x1-BN-ReLU, depthwise 3x3-BN-ReLU, 1x1-BN-ReLU; branch1:
    depthwise 3x3-BN-ReLU, 1x1-BN-ReLU.

    One deviation from ShuffleNetV2: a ReLU after each depthwise conv (the original has none). With
    random weights, a depthwise output whose 9 taps see a ReLU-sparse input is often negative with
    all its positive-weight taps at zero; the next 1x1 conv's ZPlus hands it (positive) relevance
    through ``W-``, and the depthwise conv's ZPlus then has nothing to give it to: 12-14 % of the
    relevance is lost over five units (Zennit loses the same), which would make conservation fail
    for reasons of the rule. After a ReLU, only positive depthwise outputs receive relevance, and
    those have a positive contribution."""

    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.ReLU(inplace=True),
                nn.Conv2d(inp, branch_features, 1, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """conv1-BN-ReLU and max-pool (16x16), stage2 (48 ch, 8x8, 3 units), stage3 (96 ch, 4x4,
    2 units), conv5 1x1-BN-ReLU (128 ch), ``x.mean([2, 3])``, fc."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = _conv_bn(3, 24, 3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1), ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.conv5 = _conv_bn(96, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage3(self.stage2(x)))
        return self.fc(x.mean([2, 3]))


# --------------------------------------------------------------------------------------------------
# MobileNetV2 / V3 (inverted residuals, depthwise convs, squeeze-and-excitation gating)
# --------------------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))`` with 1x1 convs as the fc layers (torchvision's
    layout). ``gate='hardsigmoid'``: ``nn.Hardsigmoid`` (MobileNetV3); ``gate='sigmoid'``:
    ``torch.sigmoid`` (MnasNet / EfficientNet)."""

    def __init__(self, channels, squeeze_channels, gate='hardsigmoid'):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate
        self.scale_activation = nn.Hardsigmoid() if gate == 'hardsigmoid' else None

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        if self.scale_activation is not None:
            return x * self.scale_activation(scale)
        return x * torch.sigmoid(scale)


class InvertedResidual(nn.Module):
    """expand 1x1-BN-act (if the expansion is not 1), depthwise kxk-BN-act (``dw_act``, default
    ``act``), optional SE, project 1x1-BN (linear bottleneck), residual add when the shape is kept."""

    def __init__(self, inp, exp, oup, kernel_size, stride, act, se=None, dw_act=None):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        layers = OrderedDict()
        if exp != inp:
            layers['expand'] = _conv_bn(inp, exp, 1, act=act)
        layers['depthwise'] = _conv_bn(exp, exp, kernel_size, stride, groups=exp, act=dw_act or act)
        if se is not None:
            layers['se'] = SqueezeExcitation(exp, max(8, exp // 4), gate=se)
        layers['project'] = _conv_bn(exp, oup, 1, act=None)
        self.block = nn.Sequential(layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """ReLU6 inverted residuals (expansion 6) with residual adds; the two 4x4 blocks carry
    squeeze-and-excitation with ``x * torch.sigmoid(...)`` (MnasNet style). 1x1 conv to 256,
    global average pool, Dropout, Linear."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        act = nn.ReLU6
        self.features = nn.Sequential(
            _conv_bn(3, 64, 3, stride=2, act=act),                        # 16x16
            InvertedResidual(64, 64, 16, 3, 1, act),
            InvertedResidual(16, 96, 24, 3, 2, act),                      # 8x8
            InvertedResidual(24, 144, 24, 3, 1, act),
            InvertedResidual(24, 144, 32, 3, 2, act, se='sigmoid'),       # 4x4
            InvertedResidual(32, 192, 32, 3, 1, act, se='sigmoid'),
            _conv_bn(32, 256, 1, act=act),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(256, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3(nn.Module):
    """MobileNetV3-Small layout: Hardswish stem, inverted residuals with ReLU (3x3) or Hardswish
    (5x5) activations, squeeze-and-excitation with ``nn.Hardsigmoid``, 1x1 conv-BN-Hardswish,
    global average pool, Linear-Hardswish-Dropout-Linear classifier.

    Two deviations keep ZPlus conservative (with zero biases, EpsilonPlus): the first block expands
    16 -> 64 channels (MobileNetV3-Small: no expansion), so that its 1x1 projection, which has no
    activation after it, has 64 ReLU-sparse inputs instead of 16 (with 16, ZPlus lost 1-1.5 % of
    the relevance at projection outputs without a positive contribution); and the Hardswish blocks
    use ReLU after their depthwise conv (Hardswish after the 1x1 expansion). With zero BatchNorm
    shifts, Hardswish zeroes whole channels (``x <= -3``), and a negative depthwise output that
    sees only a few non-zero inputs, all on negative weights, gets relevance that ZPlus cannot
    pass on (0.1-0.3 % lost); after a ReLU only positive outputs receive relevance."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        relu, hswish = nn.ReLU, nn.Hardswish
        self.features = nn.Sequential(
            _conv_bn(3, 16, 3, stride=2, act=hswish),                     # 16x16
            InvertedResidual(16, 64, 16, 3, 2, relu, se='hardsigmoid'),   # 8x8
            InvertedResidual(16, 72, 24, 3, 1, relu),
            InvertedResidual(24, 88, 24, 3, 1, relu),
            InvertedResidual(24, 96, 40, 5, 2, hswish, se='hardsigmoid', dw_act=relu),   # 4x4
            InvertedResidual(40, 160, 40, 5, 1, hswish, se='hardsigmoid', dw_act=relu),
            _conv_bn(40, 160, 1, act=hswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(160, 256), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(256, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------------
# U-Net-style encoder-decoder with a classification head
# --------------------------------------------------------------------------------------------------

class DoubleConv(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(OrderedDict([
            ('conv1', nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)),
            ('bn1', nn.BatchNorm2d(out_channels)),
            ('relu1', nn.ReLU(inplace=True)),
            ('conv2', nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)),
            ('bn2', nn.BatchNorm2d(out_channels)),
            ('relu2', nn.ReLU(inplace=True)),
        ]))


class UNet(nn.Module):
    """Encoder 32x32 (16 ch) -> 16x16 (32) -> 8x8 (64) by max-pool; decoder upsamples by 2 (nearest:
    ``nn.Upsample`` in ``dec1``, ``F.interpolate`` in ``dec2``), a 3x3 conv-ReLU, Concat with the
    encoder skip, double conv; global average pool and Linear on the 32x32 decoder output."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.enc1 = DoubleConv(3, 16)
        self.enc2 = DoubleConv(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(32, 64)
        self.up1 = nn.Upsample(scale_factor=2, mode='nearest')
        self.upconv1 = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(inplace=True))
        self.dec1 = DoubleConv(64, 32)
        self.upconv2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.dec2 = DoubleConv(32, 32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        skip1 = self.enc1(x)                                              # 16 @ 32x32
        skip2 = self.enc2(self.pool(skip1))                               # 32 @ 16x16
        x = self.bottleneck(self.pool(skip2))                             # 64 @ 8x8
        x = self.upconv1(self.up1(x))                                     # 32 @ 16x16
        x = self.dec1(torch.cat([skip2, x], 1))
        x = self.upconv2(F.interpolate(x, scale_factor=2, mode='nearest'))   # 16 @ 32x32
        x = self.dec2(torch.cat([skip1, x], 1))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_FACTORIES = {
    'alexnet': AlexNet,
    'vgg': VGG,
    'resnet50': ResNet50,
    'resnet18': ResNet18,
    'densenet': DenseNet,
    'inception': Inception,
    'squeezenet': SqueezeNet,
    'shufflenet_v2': ShuffleNetV2,
    'mobilenet_v2': MobileNetV2,
    'mobilenet_v3': MobileNetV3,
    'unet': UNet,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Build family ``name`` (one of :data:`FAMILIES`) with seeded parameters, in eval mode."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f'unknown family {name!r}; known: {", ".join(FAMILIES)}') from None
    return zoo._build(factory, seed)


def example_input(name: str, n: int = 1, seed: int = 0) -> np.ndarray:
    """A float32 batch ``[n, *INPUT_SHAPES[name]]`` with entries drawn from N(0, 1)."""
    if name not in INPUT_SHAPES:
        raise ValueError(f'unknown family {name!r}; known: {", ".join(FAMILIES)}')
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPES[name])).astype(np.float32)


def zero_biases(model: nn.Module) -> nn.Module:
    """Zero every Conv/Linear bias and every BatchNorm shift (``running_mean = 0``, ``bias = 0``; the
    scale is kept), in place; returns ``model``."""
    return zoo.zero_biases(model)


def forward_numpy(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run ``model`` on a numpy batch without gradients; returns the logits as numpy."""
    return zoo.forward_numpy(model, x)


@functools.cache
def family_onnx_bytes(name: str, seed: int = 0, dynamo: bool = False, zero_bias: bool = False) -> bytes:
    """Serialized ONNX export (input ``input``, output ``logits``, dynamic batch) of family ``name``,
    memoized per process. Legacy: opset 17 with constant folding; dynamo: opset 18."""
    model = build(name, seed)
    if zero_bias:
        zero_biases(model)
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(model, example_input(name, 2), os.path.join(directory, f'{name}.onnx'), dynamo=dynamo)
        with open(path, 'rb') as handle:
            return handle.read()
