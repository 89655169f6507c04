"""LeNet-300-100 (an MLP) and LeNet-5 (two convolutions, three linear layers)."""

from __future__ import annotations

from torch import nn


class LeNet300(nn.Module):
    """784-300-100-10 fully connected net of LeCun et al. (1998), the classic pruning benchmark."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; conv2 feeds fc1 through a flatten (Conv→Flatten→Linear)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        side = ((input_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"input_size must be at least 10 for LeNet-5, got {input_size}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def lenet300(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    return LeNet300(num_classes, in_channels, input_size)


def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size)
