"""Tiny models and data shared by the tests: everything here runs in well under a second on a CPU."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch
from torch import nn

from structprune import models

# (zoo name, options, input shape): widths shrunk so every method prunes each model in about a second
ZOO = {
    "lenet300": ({}, (1, 28, 28)),
    "lenet5": ({}, (1, 28, 28)),
    "vgg16": ({"width_mult": 0.125}, (1, 16, 16)),
    "resnet20": ({"width_mult": 0.5}, (1, 16, 16)),
    "resnet56": ({"width_mult": 0.25}, (1, 16, 16)),
    "mobilenetv2": ({"width_mult": 0.25}, (1, 16, 16)),
}


def make_zoo_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    options, shape = ZOO[name]
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=shape[0], **options)
    _randomise_batchnorm(model)
    return model.eval(), shape


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give BatchNorms non-trivial statistics, as a trained network has, so BN handling is exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))


def calibration(shape, samples: int = 48, batch: int = 16, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def write_idx(path, array_bytes: bytes, dims: list[int]) -> None:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array_bytes)


@pytest.fixture
def fmnist_dir(tmp_path):
    """A 64-image Fashion-MNIST look-alike in the IDX format, so the CLI's real reader is exercised."""
    root = tmp_path / "fmnist"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("t10k", 32)):
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        images = (torch.rand(n, 28, 28, generator=gen) * 60).to(torch.uint8)
        images += (labels * 19).to(torch.uint8)[:, None, None]  # class-dependent brightness: learnable
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.numpy().tobytes(), [n, 28, 28])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.numpy().tobytes(), [n])
    return root
