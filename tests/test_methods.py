"""Baselines and options: what each criterion prefers, greedy selection vs random, refit, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune import StructPruneError, methods
from structprune import capture as capture_module
from structprune.capture import capture
from structprune.graph import PruningGraph
from structprune.methods.base import Selection
from structprune.refit import refit, relative_residuals


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
    (group,) = PruningGraph(net, data[0][0][:1]).all_groups()
    view = capture(net, group, [data[0][0]])
    single = [relative_residuals(view, [Selection(torch.tensor([c]))])[0] for c in range(24)]  # every channel
    first = methods.get("gfs").select(view, 1).keep_idx.tolist()
    assert first == [min(range(24), key=single.__getitem__)]


def _views(name: str, sensitivity: bool = False):
    """Each group's capture (with PFP's sensitivities over every position when ``sensitivity``, as prune does)."""
    model, shape = make_zoo_model(name)
    batches = [x for x, _ in calibration(shape, samples=256, batch=64)]
    graph = PruningGraph(model, batches[0][:1])
    return [capture(model, g, batches, sensitivity_samples=256 if sensitivity else 0) for g in graph.all_groups()]


def _refit_rows(consumer, keep_idx, stride):
    """The refit's least-squares problem, written out: the kept channels' rows (with a constant where the layer
    can take a shift), the dense layer's output without bias as the target, and each output's weight."""
    z = consumer.inputs[::stride][:, keep_idx].reshape(len(consumer.inputs[::stride]), -1).double()
    full = consumer.inputs[::stride].reshape(len(z), -1).double()
    y = full @ consumer.weight.reshape(len(consumer.weight), -1).double().T
    if consumer.bias is not None or consumer.normalized:
        z = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], dim=1)
    return z, y, consumer.output_scale.double().square()


def _error(z, y, scale_sq, coef):
    return float((scale_sq * (y - z @ coef).square().sum(dim=0)).sum())


@pytest.mark.parametrize("method", ["ispasp", "pfp", "pfp-rand", "magnitude", "random", "thinet"])
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_refit_reaches_the_least_squares_optimum_and_reports_the_error_of_what_it_applies(method, name):
    """The refit's weights, checked on the captured rows against torch.linalg.lstsq of the same problem: 95% of the
    way from the method's own weights to the optimum (the ridge costs a little: at most 1.3% of the way in these
    cases, 2026-12-07), never worse than the method's weights, and the reported errors are those of the weights
    applied."""
    chooser = methods.get(method)
    checked = 0
    for view in _views(name, sensitivity=chooser.needs.sensitivity):
        selection = chooser.select(view, max(1, view.channels // 3))
        fitted = refit(view, selection)
        for consumer in view.consumers:
            stats = fitted.stats["refit"][consumer.name]
            if isinstance(stats, str):  # a grouped convolution, or too many inputs: left as chosen
                continue
            keep = selection.keep_idx
            features = len(keep) * consumer.weight.shape[2]
            stride = max(1, len(consumer.inputs) // (capture_module.ROWS_PER_FEATURE * features))
            z, y, scale_sq = _refit_rows(consumer, keep, stride)
            optimum = _error(z, y, scale_sq, torch.linalg.lstsq(z, y).solution)
            start = (selection.consumer_weights or {}).get(consumer.name, consumer.weight[:, keep])
            start = start.reshape(len(y.T), -1).double().T
            shift = torch.zeros(z.shape[1] - features, y.shape[1], dtype=torch.float64)  # the bias as it is
            if consumer.normalized:  # a BatchNorm follows: its recalibration absorbs the best constant
                shift = torch.linalg.lstsq(z[:, -1:], y - z[:, :features] @ start).solution
            before = _error(z, y, scale_sq, torch.cat([start, shift]))
            weight = fitted.consumer_weights[consumer.name].reshape(len(y.T), -1).double().T
            bias = (fitted.consumer_biases or {}).get(consumer.name)
            base = consumer.bias if consumer.bias is not None else torch.zeros(len(y.T))
            delta = (bias.double() - base.double())[None] if bias is not None else shift
            applied = _error(z, y, scale_sq, torch.cat([weight, delta]))
            assert applied == pytest.approx(stats["error_after"], rel=1e-6, abs=1e-9)
            assert before == pytest.approx(stats["error_before"], rel=1e-6, abs=1e-9)
            assert applied <= before * (1 + 1e-9)
            if z.shape[0] >= 2 * z.shape[1]:  # rows determine the weights: the fit closes the gap to the optimum
                assert applied - optimum <= 0.05 * (before - optimum) + 1e-12 * float(y.square().sum())
                checked += 1
    assert checked >= 2


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


def test_taylor_needs_labels_and_keeps_the_channels_of_largest_activation_times_gradient():
    """Molchanov's criterion from autograd, independently: for a producer without bias, Σ_w w·∂L/∂w over channel
    c's filter is Σ a_c·∂L/∂a_c over the samples (a_c: its output), and the importance is its square."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 24, bias=False), nn.ReLU(), nn.Linear(24, 6))
    gen = torch.Generator().manual_seed(100)
    data = [(torch.randn(64, 10, generator=gen), torch.randint(0, 6, (64,), generator=gen)) for _ in range(2)]
    with pytest.raises(StructPruneError, match="needs labelled calibration batches"):
        structprune.prune(net, [data[0][0]], "taylor", 0.5, progress=False)
    scores = torch.zeros(24, dtype=torch.float64)
    for x, y in data:  # the loss of each batch, gradients summed over the batches
        a = net[0](x)
        a.retain_grad()
        nn.functional.cross_entropy(net[2](net[1](a)), y).backward()
        scores += (a * a.grad).sum(dim=0).double().detach()
    net.zero_grad(set_to_none=True)
    expected = torch.argsort(scores.square(), descending=True)[:12].sort().values
    result = structprune.prune(net, data, "taylor", 0.5, refit=False, progress=False)
    kept = [next(i for i in range(24) if torch.equal(net[0].weight[i], row)) for row in result.model[0].weight]
    assert kept == expected.tolist()
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
