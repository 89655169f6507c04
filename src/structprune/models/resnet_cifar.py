"""ResNets in the CIFAR style (He et al. 2016, section 4.2): three stages of 16/32/64 channels.

Shortcuts are identity where shapes match and a 1×1 conv + BN where they do not ("option B").
``resnet20``/``resnet56`` use BasicBlocks (depth = 6n+2); ``resnet164`` uses Bottlenecks (9n+2).
"""

from __future__ import annotations

from torch import nn


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, depth: int = 20, block: str = "basic", num_classes: int = 10, in_channels: int = 3,
                 width_mult: float = 1.0):
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        per_block = 2 if block == "basic" else 3
        if (depth - 2) % (3 * per_block) != 0:
            raise ValueError(f"depth must be {3 * per_block}n+2 for {block} blocks, got {depth}")
        blocks_per_stage = (depth - 2) // (3 * per_block)
        widths = [max(1, int(round(w * width_mult))) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for index, planes in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (index > 0 and b == 0) else 1
                blocks.append(block_cls(in_planes, planes, stride))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return ResNetCIFAR(20, "basic", num_classes, in_channels, width_mult)


def resnet56(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return ResNetCIFAR(56, "basic", num_classes, in_channels, width_mult)


def resnet164(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return ResNetCIFAR(164, "bottleneck", num_classes, in_channels, width_mult)


def resnet_cifar(num_classes: int = 10, in_channels: int = 3, depth: int = 20, block: str = "basic",
                 width_mult: float = 1.0) -> nn.Module:
    """Any depth; e.g. ``create("resnet_cifar", depth=11, block="bottleneck")`` for a small Bottleneck net."""
    return ResNetCIFAR(depth, block, num_classes, in_channels, width_mult)
