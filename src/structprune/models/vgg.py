"""VGG-16 in the CIFAR style: 13 3×3 conv+BN+ReLU layers, one linear classifier."""

from __future__ import annotations

from torch import nn

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                # ceil_mode keeps the five poolings valid for 28×28 inputs (28→14→7→4→2→1)
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                width = max(1, int(round(item * width_mult)))
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def vgg16(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    return VGG(_VGG16, num_classes, in_channels, width_mult)
