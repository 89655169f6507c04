"""Baselines and options: what each criterion prefers, greedy selection vs random, refit, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune import StructPruneError, methods
from structprune.capture import capture
from structprune.graph import PruningGraph
from structprune.refit import refit


def two_layer(seed: int, hidden: int = 24) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 6))
    gen = torch.Generator().manual_seed(seed + 100)
    return net, [(torch.randn(128, 10, generator=gen), torch.randint(0, 6, (128,), generator=gen))]


@pytest.mark.parametrize("seed", range(5))
def test_gfs_residual_never_worse_than_random(seed):
    net, data = two_layer(seed)
    gfs = structprune.prune(net, data, "gfs", 0.25, progress=False).layers[0]["relative_residual"]
    for draw in range(3):
        rand = structprune.prune(net, data, "random", 0.25, seed=draw, progress=False).layers[0]
        assert gfs <= rand["relative_residual"] + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_gfs_first_pick_is_the_best_single_channel(seed):
    net, data = two_layer(seed)
    singles = [structprune.prune(net, data, "random", 1 / 24, seed=s, progress=False).layers[0] for s in range(40)]
    best = min(layer["relative_residual"] for layer in singles)
    gfs = structprune.prune(net, data, "gfs", 1 / 24, progress=False).layers[0]["relative_residual"]
    assert gfs <= best + 1e-9


def _views(name: str):
    model, shape = make_zoo_model(name)
    batches = [x for x, _ in calibration(shape)]
    graph = PruningGraph(model, batches[0][:1])
    return [capture(model, g, batches) for g in graph.all_groups()]


@pytest.mark.parametrize("method", ["ispasp", "pfp", "pfp-rand", "magnitude", "random", "thinet"])
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_refit_never_increases_reconstruction_error(method, name):
    chooser = methods.get(method)
    for view in _views(name):
        keep = max(1, view.channels // 3)
        selection = chooser.select(view, keep)
        for consumer_stats in refit(view, selection).stats["refit"].values():
            assert consumer_stats["error_after"] <= consumer_stats["error_before"] * (1 + 1e-9)


def test_refit_reported_next_to_the_paper_faithful_residual():
    model, shape = make_zoo_model("lenet5")
    result = structprune.prune(model, calibration(shape), "magnitude", 0.5, refit=True, progress=False)
    assert result.refit and all(
        layer["relative_residual_refit"] <= layer["relative_residual"] + 1e-6 for layer in result.layers)
    assert any(layer["relative_residual_refit"] < 0.9 * layer["relative_residual"] for layer in result.layers)


def test_fpgm_drops_a_duplicated_filter():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]]))
    result = structprune.prune(net, [torch.randn(8, 4)], "fpgm", 0.8, progress=False)
    kept = {tuple(row.tolist()) for row in result.model[0].weight}
    assert (1.0, 0, 0, 0) in kept and (0, 1.0, 0, 0) in kept and (0, 0, 0, 1.0) in kept


def test_bn_scale_keeps_largest_gamma_and_falls_back_without_batchnorm():
    model, shape = make_zoo_model("vgg16")
    graph = PruningGraph(model, torch.zeros(1, *shape))
    group = graph.all_groups()[0]
    gamma = group.batchnorms[0].module.weight.detach().abs()
    result = structprune.prune(model, calibration(shape), "bn-scale", 0.5, progress=False)
    first = result.layers[0]
    assert first["criterion"] == "bn-scale"
    kept_gamma = result.model.get_submodule(group.batchnorms[0].name).weight.detach().abs()
    assert torch.allclose(kept_gamma.sort().values, gamma.sort().values[-len(kept_gamma):])
    mlp = structprune.prune(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), [torch.randn(8, 4)],
                            "bn-scale", 0.5, progress=False)
    assert mlp.layers[0]["criterion"] == "magnitude (no BatchNorm)"


def test_taylor_needs_labels_and_uses_the_loss():
    net, data = two_layer(0)
    with pytest.raises(StructPruneError, match="needs labelled calibration batches"):
        structprune.prune(net, [data[0][0]], "taylor", 0.5, progress=False)
    result = structprune.prune(net, data, "taylor", 0.5, progress=False)
    assert result.model[0].out_features == 12
    assert all(p.grad is None for p in net.parameters())  # the input model is untouched


def test_pfp_top_keeps_dominant_channels_deterministically():
    from structprune.methods.base import ConsumerView, GroupView
    from structprune.methods.pfp import draws_for_distinct

    prob = torch.tensor([0.5, 0.3, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    m = draws_for_distinct(prob, 3)
    assert float((1 - (1 - prob).pow(m)).sum()) == pytest.approx(3, abs=1e-6)

    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(64, 8, 1, generator=gen)
    weight = torch.full((4, 8, 1), 0.1)
    weight[:, 0] = 10.0  # channel 0 carries almost all of every output
    consumer = ConsumerView("fc", inputs, weight, None, torch.ones(4))
    for seed in range(5):
        view = GroupView("g", 8, (consumer,), (), seed=seed)
        selection = methods.get("pfp-top").select(view, 3)
        assert 0 in selection.keep_idx.tolist() and selection.stats["deterministic"] >= 1
        assert torch.equal(selection.consumer_weights["fc"][:, 0], weight[:, 0])  # not reweighted
        sampled = selection.consumer_weights["fc"][:, 1:]
        assert not torch.allclose(sampled, weight[:, selection.keep_idx[1:]])  # the sampled ones are


def test_new_methods_are_registered_with_documented_options():
    for name in ["fpgm", "bn-scale", "taylor", "thinet", "gfs", "pfp-top"]:
        assert name in methods.available()
        assert methods.get(name).name == name


def test_coupled_magnitude_also_weighs_the_columns_that_read_a_channel():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # every channel's producer row has the same norm...
        net[2].weight.copy_(torch.tensor([[0.1, 5.0, 0.2, 3.0], [0.1, 5.0, 0.2, 3.0]]))  # ...its readers differ
        net[0].weight[0] += 0.01  # producer-only magnitude prefers channel 0
    calib = [torch.randn(8, 3)]
    plain = structprune.prune(net, calib, "magnitude", 0.5, refit=False, progress=False)
    coupled = structprune.prune(net, calib, "magnitude", 0.5, refit=False, progress=False, coupled=True, norm=2)
    assert plain.model[2].weight[0].tolist()[0] == pytest.approx(0.1)  # kept channel 0
    assert sorted(coupled.model[2].weight[0].tolist()) == pytest.approx([3.0, 5.0])  # kept channels 1 and 3


def test_the_contribution_gram_of_whole_rows_is_the_exact_one_and_estimates_it_when_sampled():
    from structprune.methods.base import ConsumerView

    gen = torch.Generator().manual_seed(0)
    inputs, weight = torch.randn(300, 6, 4, generator=gen), torch.randn(5, 6, 4, generator=gen)
    view = ConsumerView(name="c", inputs=inputs, weight=weight, bias=None, output_scale=torch.rand(5, generator=gen))
    exact = view.contribution_gram(max_pairs=300 * 5)  # every (row, output) pair
    torch.testing.assert_close(view.contribution_gram(max_pairs=300 * 5, whole_rows=True), exact, rtol=1e-5,
                               atol=0)  # float32 products summed in another order
    sampled = view.contribution_gram(max_pairs=150 * 5, generator=torch.Generator().manual_seed(1), whole_rows=True)
    assert float((sampled - exact).norm() / exact.norm()) < 0.2  # half the rows, scaled to the whole sum
