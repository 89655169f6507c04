"""Failure handling: custom layers, foreign dtypes, broken forwards, and a fuzz over random small nets."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import structprune
from conftest import prune_keeping_everything
from structprune import StructPruneError


class Mix(nn.Module):
    """A custom layer with its own weight matrix, which Torch-Pruning can only guess how to cut."""

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels, channels) / channels**0.5)

    def forward(self, x):
        return x @ self.w


class Fold(nn.Module):
    """Hard-codes the width of its input: removing any of those channels breaks it."""

    def forward(self, x):
        return x.view(x.shape[0], 4, 5).mean(dim=2)


def calib(features: int = 10, n: int = 64, dtype=torch.float32) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, features, generator=gen, dtype=dtype), torch.zeros(n, dtype=torch.long))]


def test_a_group_through_a_custom_layer_is_skipped_with_a_warning_and_the_rest_pruned():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), Mix(20), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    with pytest.warns(UserWarning, match=r"group 0 is not pruned: custom layer parameter 2\.w \(20, 20\)"):
        result = structprune.prune(net, calib(), "ispasp", 0.5, progress=False)
    assert [s["group"] for s in result.skipped] == ["0"]
    assert result.model[0].out_features == 20 and result.model[3].out_features == 10
    assert result.model(torch.randn(3, 10)).shape == (3, 5)


@pytest.mark.parametrize("later_group", [False, True])
@pytest.mark.parametrize("method, options", [("ispasp", {}),
                                             ("magnitude", {"refit": False, "recalibrate": False})])
def test_a_removal_that_breaks_the_forward_pass_is_named(method, options, later_group):
    # the forward pass is checked once at the end (or fails in a later group's capture), then the group is named
    # by pruning again with a check after every group
    tail = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)] if later_group else [nn.Linear(4, 5)]
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), Fold(), *tail)
    with pytest.raises(StructPruneError, match=r"pruning group 0 broke the model's forward pass .*--ignore 0"):
        structprune.prune(net, calib(), method, 0.5, progress=False, **options)
    result = structprune.prune(net, calib(), "ispasp", 0.5, ignored_layers=["0"], progress=False)
    assert result.model(torch.randn(2, 10)).shape == (2, 5)


def test_a_removal_that_breaks_the_forward_pass_in_place_says_the_model_is_left_partly_pruned():
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), Fold(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(StructPruneError, match=r"forward pass fails .*left partly pruned: prune a copy"):
        structprune.prune(net, calib(), "ispasp", 0.5, in_place=True, progress=False)
    assert net[0].out_features < 20  # what the caller holds now, as the error says


@pytest.mark.parametrize("model_dtype, data_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_calibration_data_of_another_dtype_is_cast_to_the_model(model_dtype, data_dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).to(model_dtype)
    for method in ("ispasp", "pfp", "taylor"):
        result = structprune.prune(net, calib(dtype=data_dtype), method, 0.5, progress=False)
        assert result.model[0].weight.dtype == model_dtype
        assert result.model(torch.randn(2, 10, dtype=model_dtype)).shape == (2, 5)


def test_mismatched_number_of_classes_is_a_clear_error(tmp_path, capsys, fmnist_dir):
    from structprune import cli

    ckpt = tmp_path / "five.pt"
    structprune.save(structprune.models.create("lenet300", num_classes=5), ckpt)
    for command in (["prune", str(ckpt), "--out", str(tmp_path / "p.pt")],
                    ["finetune", str(ckpt), "--out", str(tmp_path / "f.pt")]):
        code = cli.main([*command, "--data-dir", str(fmnist_dir), "--limit", "64", "--no-progress"])
        assert code == 2 and "10 classes but the model outputs (5,)" in capsys.readouterr().err


def random_net(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    """A random small MLP or CNN (BatchNorm, pooling, dropout, Flatten→Linear), and its input shape."""
    if rng.random() < 0.4:
        widths = [rng.randint(2, 24) for _ in range(rng.randint(1, 4))]
        inputs = rng.randint(3, 12)
        layers, previous = [], inputs
        for width in widths:
            layers += [nn.Linear(previous, width), rng.choice([nn.ReLU(), nn.Tanh(), nn.GELU()])]
            if rng.random() < 0.3:
                layers.append(nn.BatchNorm1d(width))
            previous = width
        return nn.Sequential(*layers, nn.Linear(previous, rng.randint(1, 6))), (inputs,)
    channels, side = rng.randint(1, 3), rng.choice([8, 10, 12])
    layers, previous, size = [], channels, side
    for _ in range(rng.randint(1, 3)):
        width, kernel = rng.randint(2, 12), rng.choice([1, 3])
        layers += [nn.Conv2d(previous, width, kernel, padding=kernel // 2, bias=rng.random() < 0.5)]
        if rng.random() < 0.5:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        if rng.random() < 0.4 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        previous = width
    head = rng.random()
    if head < 0.5:
        layers += [nn.Flatten(), nn.Linear(previous * size * size, rng.randint(2, 10))]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(previous, rng.randint(2, 10))]
    return nn.Sequential(*layers), (channels, side, side)


@pytest.mark.parametrize("case", range(40))
def test_fuzz_random_nets_and_ratios_always_prune_to_a_working_model(case):
    rng = random.Random(case)
    net, shape = random_net(rng)
    torch.manual_seed(case)
    net.eval()
    data = [(torch.randn(32, *shape), torch.randint(0, 2, (32,)))]
    method = rng.choice(["ispasp", "pfp", "pfp-rand", "magnitude", "fpgm", "thinet", "gfs", "random", "bn-scale"])
    if rng.random() < 0.3:
        budget = structprune.Target(rng.choice([0.4, 0.6, 0.8]), rng.choice(["flops", "params"]), tolerance=0.5)
    else:
        budget = rng.choice([1.0, 0.75, 0.5, 0.3, 0.05])
    x = torch.randn(5, *shape)
    with torch.no_grad():
        dense = net(x)
    result = structprune.prune(net, data, method, budget, progress=False, refit=rng.random() < 0.3)
    with torch.no_grad():
        out = result.model(x)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert result.after["params"] <= result.before["params"]
    if budget == 1.0:
        assert torch.equal(out, dense) and result.after == result.before  # every group left whole
        if method not in ("pfp-rand", "taylor"):  # every stage taken with every channel kept: the same function
            kept_all = prune_keeping_everything(net, data, method)
            with torch.no_grad():
                assert torch.allclose(kept_all(x), dense, rtol=1e-5, atol=1e-5)
