"""Transposed convolutions (decoders, upsampling heads) lose output channels like convs; the channels they read
stay (their input rows are not patches of a linear map structprune models)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

import structprune


def decoder() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1))
    with torch.no_grad():  # output channel j of the transposed conv has norm growing with j
        net[2].weight.mul_(torch.arange(1.0, 7.0)[None, :, None, None])
        net[3].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_a_transposed_conv_loses_its_weakest_output_channels_and_computes_the_rest():
    model, x = decoder(), torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = structprune.prune(model, [x], "magnitude", 0.5, refit=False, recalibrate=False, progress=False)
    pruned = result.model
    assert pruned[2].out_channels == 3 and pruned[3].num_features == 3 and pruned[5].in_channels == 3
    assert torch.equal(pruned[2].bias, model[2].bias[3:])  # the three strongest (last) channels stay
    assert [layer["group"] for layer in result.layers] == ["2"]
    # the channels it reads are left whole, with a warning saying why
    assert pruned[0].out_channels == 8
    assert any("consumer 2 (ConvTranspose2d) is not a Linear, Conv1d or Conv2d" in str(w.message) for w in caught)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[3].weight[:3] = 0
        masked[3].bias[:3] = 0
    assert torch.allclose(pruned(x), masked(x), atol=1e-5)


def test_a_transposed_conv_as_the_output_layer_keeps_its_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 2, 2, stride=2)).eval()
    x = torch.randn(4, 1, 6, 6)
    result = structprune.prune(model, [x], "ispasp", 0.5, progress=False)
    assert result.model(x).shape == (4, 2, 12, 12)
    assert result.model[0].out_channels == 4  # the conv before is pruned; the transposed conv reads 8 → skipped
