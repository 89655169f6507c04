"""Sizes read off the dense model (structprune.sizing) are the pruned copy's, to the MAC and the parameter;
where its rules do not reach, the Sizer prunes copies, and a wrong reading is caught before it is used."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import structprune
from conftest import ZOO, calibration, make_zoo_model, tiny_bert
from structprune import allocate
from structprune.graph import build_graph
from structprune.measure import count
from structprune.sizing import analytic_sizes


def _output_layer(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _pruned_count(model, example, keeps, scope):
    copied = copy.deepcopy(model)
    graph = build_graph(copied, example, [_output_layer(copied)], scope)
    for group in graph.groups():
        graph.apply(group, torch.arange(keeps.get(group.name, group.channels)))
    return count(copied, example)


@pytest.mark.parametrize("scope", ["all", "inner"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_sizes_read_off_the_dense_model_are_the_pruned_copys(name, scope):
    model, shape = make_zoo_model(name)
    example = torch.randn(1, *shape)
    graph = build_graph(copy.deepcopy(model), example, [], scope)
    graph = build_graph(graph.model, example, [_output_layer(graph.model)], scope)
    groups = graph.all_groups()
    sizes = analytic_sizes(model, example, groups)
    assert sizes is not None
    assert sizes.size({}) == count(model, example)
    rng = random.Random(0)
    for _ in range(3):
        keeps = {g.name: rng.randint(1, g.channels) for g in groups}
        assert sizes.size(keeps) == _pruned_count(model, example, keeps, scope)


class _GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean(dim=(2, 3)))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.up(x)
        return self.head(self.attention(x, x, x)[0][:, -1])


@pytest.mark.parametrize("make, example", [(_GroupedConv, lambda: torch.randn(1, 3, 9, 9)),
                                           (_Attention, lambda: torch.randn(1, 5, 4)),
                                           (tiny_bert, lambda: {"input_ids": torch.randint(0, 20, (1, 7))})])
def test_models_the_rules_do_not_cover_are_sized_on_pruned_copies(make, example):
    torch.manual_seed(0)
    model, x = make().eval(), example()
    graph = build_graph(copy.deepcopy(model), x, [])
    assert analytic_sizes(model, x, graph.all_groups()) is None
    sizer = allocate.Sizer(model, x, [], build_graph(copy.deepcopy(model), x, []))
    assert sizer.analytic is None


def test_a_wrong_reading_is_caught_and_the_target_searched_on_pruned_copies(monkeypatch):
    model, shape = make_zoo_model("resnet20")
    right = structprune.prune(model, calibration(shape, samples=16), "magnitude", structprune.Target(0.5),
                              refit=False, recalibrate=False, progress=False)
    real_size = structprune.sizing.AnalyticSizes.size
    monkeypatch.setattr(structprune.sizing.AnalyticSizes, "size",
                        lambda self, keeps: {k: int(v * 0.9) for k, v in real_size(self, keeps).items()}
                        if keeps else real_size(self, keeps))
    wrong = structprune.prune(model, calibration(shape, samples=16), "magnitude", structprune.Target(0.5),
                              refit=False, recalibrate=False, progress=False)
    assert wrong.budget["achieved"] == right.budget["achieved"]
    assert [layer["kept"] for layer in wrong.layers] == [layer["kept"] for layer in right.layers]
    assert wrong.after == right.after
