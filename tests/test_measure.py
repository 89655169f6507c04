"""MACs are Torch-Pruning's count, taken on the model itself (no deep copy): the same number as
``tp.utils.count_ops_and_params`` on every kind of model it knows, and the model untouched."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch_pruning as tp
from torch import nn

from conftest import ZOO, make_zoo_model, tiny_bert
from structprune.measure import count


def _torch_pruning(model, example):
    with contextlib.redirect_stdout(io.StringIO()):
        return tp.utils.count_ops_and_params(model, example)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.lstm, self.rnn = nn.GRU(6, 8, batch_first=True), nn.LSTM(8, 5, 2), nn.RNN(5, 4)
        self.cell = nn.LSTMCell(4, 3)

    def forward(self, x):
        x = self.lstm(self.gru(x)[0])[0]
        x = self.rnn(x)[0]
        return self.cell(x[:, -1])[0]


class _Shared(nn.Module):
    """One layer run twice, one kept in two containers, a BatchNorm inside a container Torch-Pruning does not
    know, attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.block = nn.Sequential(nn.BatchNorm2d(8), nn.GELU(), nn.Upsample(scale_factor=2))
        self.again = nn.ModuleList([self.block])
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.depthwise(self.conv(x) + self.conv(x)))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.attention(tokens, tokens, tokens)[0]
        return self.head(nn.functional.layer_norm(tokens, (8,)).mean(dim=1))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_macs_and_params_are_torch_prunings(name):
    model, shape = make_zoo_model(name)
    example = torch.randn(3, *shape)
    macs, params = _torch_pruning(model, example)
    assert count(model, example) == {"macs": int(macs), "params": int(params)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_graphs_ordering_pass_counts_the_model_as_count_does(name):
    from structprune.graph import build_graph
    from structprune.measure import counting

    model, shape = make_zoo_model(name)
    example = torch.randn(1, *shape)
    model.train()  # the pass runs in eval mode whatever the model's mode
    graph = build_graph(model, example, observe=counting(model))
    assert graph.observed() == count(model, example) and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("make, example", [
    (_Recurrent, lambda: torch.randn(2, 7, 6)),
    (_Shared, lambda: torch.randn(2, 3, 9, 9)),
])
def test_layers_torch_pruning_has_formulas_for_count_as_in_its_counter(make, example):
    torch.manual_seed(0)
    model, x = make().eval(), example()
    macs, params = _torch_pruning(model, x)
    assert macs > 0 and count(model, x) == {"macs": int(macs), "params": int(params)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(hasattr(m, "__flops__") for m in model.modules())  # nothing left on the layers
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_keyword_inputs_count_per_sample_as_torch_prunings_counter_does():
    model = tiny_bert()
    inputs = {"input_ids": torch.randint(0, 20, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    macs, _ = _torch_pruning(model, inputs)
    # keyword inputs are one "sample" to the counter (it divides by the first positional input's length), so
    # its count is the batch's; the attention products are counted alike: Q·Kᵀ and A·V in each of 2 layers,
    # 9 tokens, 4 heads of 8, 2 sequences
    assert count(model, inputs)["macs"] == int(macs) + 2 * (2 * 2 * 9 * 9 * 32)


def test_counting_leaves_training_mode_and_hooks_as_they_were():
    model, shape = make_zoo_model("resnet20")
    model.train()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    count(model, torch.randn(2, *shape))
    assert model.training and sum(len(m._forward_hooks) for m in model.modules()) == hooks
