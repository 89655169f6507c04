"""CNNs in the style of Torch-Pruning's CIFAR zoo (small; 1×28×28 inputs), for the zoo benchmark and the
tests: built through ``structprune.models.create("zoo.nets:Name")``, so that a checkpoint names them as importable
classes and loads in a fresh process (with benchmarks/ on the path)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """PreAct-ResNet (He et al. 2016b): BN-ReLU before each conv, one block per stage."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(width, width), PreActBlock(width, 2 * width, 2),
                                    PreActBlock(2 * width, 4 * width, 2))
        self.bn = nn.BatchNorm2d(4 * width)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Inception(nn.Module):
    """GoogLeNet's inception module: 1×1, 1×1→3×3, 1×1→3×3→3×3 and pool→1×1 branches, concatenated."""

    def __init__(self, cin: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int):
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(cin, n1, 1))
        self.b2 = nn.Sequential(*_conv_bn(cin, n3r, 1), *_conv_bn(n3r, n3))
        self.b3 = nn.Sequential(*_conv_bn(cin, n5r, 1), *_conv_bn(n5r, n5), *_conv_bn(n5, n5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.pre = nn.Sequential(*_conv_bn(in_channels, 16))
        self.a3 = Inception(16, 8, 8, 12, 4, 4, 4)  # 28 channels out
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b3 = Inception(28, 12, 8, 16, 4, 8, 8)  # 44 channels out
        self.linear = nn.Linear(44, num_classes)

    def forward(self, x):
        out = self.b3(self.pool(self.a3(self.pre(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class DenseBottleneck(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class DenseNetSmall(nn.Module):
    """DenseNet-BC-like: two dense blocks of three bottlenecks (growth 4) with a transition between."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, growth: int = 4):
        super().__init__()
        width = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage in range(2):
            for _ in range(3):
                blocks.append(DenseBottleneck(width, growth))
                width += growth
            if stage == 0:
                blocks += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                width //= 2
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite; the gate is a lambda held by the module."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = lambda t: torch.sigmoid(t)  # noqa: E731  (a lambda inside a module, on purpose)

    def forward(self, x):
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(torch.relu(self.fc1(w))))


class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.se(self.body(x)) + self.shortcut(x))


class SEResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width))
        self.layers = nn.Sequential(SEBlock(width, width), SEBlock(width, 2 * width, 2),
                                    SEBlock(2 * width, 4 * width, 2))
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1×1 → grouped 3×3 (cardinality 4) → 1×1, plus the shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, cardinality: int = 4):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), *_conv_bn(width, width, 3, stride, cardinality),
                                  nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNeXtSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16))
        self.layers = nn.Sequential(ResNeXtBlock(16, 16, 32), ResNeXtBlock(32, 32, 64, 2))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Conv1dNet(nn.Module):
    """A 1-d sequence classifier (2 channels × 32 steps): conv-BN-ReLU stack, a residual block, global pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16))
        self.down = nn.Sequential(nn.Conv1d(16, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.stem(x)
        out = self.down(torch.relu(out + self.block(out)))
        return self.linear(out.mean(-1))


class TorchTransformerClassifier(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention) over 8 steps of 6 features, mean-pooled, a Linear head."""

    def __init__(self, num_classes: int = 10, features: int = 6, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))
