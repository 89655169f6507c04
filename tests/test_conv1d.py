"""1-d convolutions (audio, sequences) are pruned like 2-d ones: rows of a Conv1d's input are its patches, a
conv that pads with anything but zeros is left whole."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import structprune
from structprune.capture import capture
from structprune.graph import PruningGraph


def sequence_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2), nn.ReLU(),
                         nn.Conv1d(8, 6, 5, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7, 5)).eval()


def test_captured_rows_of_a_conv1d_reproduce_its_output():
    model, x = sequence_net(), torch.randn(6, 2, 14)
    groups = {g.name: g for g in PruningGraph(model, x[:1]).all_groups()}
    for name, consumer_index in (("0", 3), ("3", 5)):
        (view,) = capture(model, groups[name], [x], memory_bytes=2**30).consumers
        expected = model[: consumer_index + 1](x)  # every position of every sample, in order
        assert torch.allclose(view.output(), expected.permute(0, 2, 1).reshape(-1, expected.shape[1]), atol=1e-5)


def test_pruned_conv1d_net_equals_the_dense_net_with_those_channels_zeroed():
    model, x = sequence_net(), torch.randn(32, 2, 14)
    result = structprune.prune(model, [x], "ispasp", 0.5, refit=False, recalibrate=False, progress=False)
    assert [(g["group"], g["kept"]) for g in result.layers] == [("0", 4), ("3", 4), ("5", 3)]
    masked = copy.deepcopy(model)
    pruned_net = result.model
    for producer, bn in ((0, 1), (3, None), (5, None)):  # zero the removed channels' outputs in the dense copy
        kept = pruned_net[producer].out_channels
        dense_rows = masked[producer].out_channels
        removed = torch.ones(dense_rows, dtype=torch.bool)
        removed[_kept_rows(model[producer], pruned_net[producer])] = False
        with torch.no_grad():
            masked[producer].weight[removed] = 0
            masked[producer].bias[removed] = 0
            if bn is not None:
                masked[bn].weight[removed] = 0
                masked[bn].bias[removed] = 0
        assert removed.sum() == dense_rows - kept
    assert torch.allclose(pruned_net(x), masked(x), atol=1e-5)
    assert result.after["macs"] < result.before["macs"]


def _kept_rows(dense: nn.Module, pruned: nn.Module) -> torch.Tensor:
    """Which of the dense layer's output channels the pruned one kept (their biases, untouched without refit)."""
    return torch.tensor([int((dense.bias == b).nonzero()) for b in pruned.bias])


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_a_conv_that_pads_with_other_values_than_zeros_is_left_whole(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3, padding=1, padding_mode=mode),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 3)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = structprune.prune(model, [torch.randn(8, 2, 14)], "magnitude", 0.5, progress=False)
    assert result.model[0].out_channels == 8 and result.model[2].out_channels == 2
    assert any(f"padding_mode='{mode}'" in str(w.message) for w in caught)
    assert result.skipped[0]["group"] == "0"
