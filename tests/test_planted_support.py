"""On a two-layer ReLU net whose output depends only on a planted set of hidden units, the
data-informed methods find exactly that set, while the weight-magnitude criterion is fooled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune

HIDDEN, PLANTED, INPUTS = 40, 8, 20


def planted_net(seed: int = 0) -> tuple[nn.Module, list[int]]:
    """fc2 reads only the planted units. The other units have the largest weights but rarely fire
    (a large negative bias), so only data tells that they do not matter."""
    gen = torch.Generator().manual_seed(seed)
    planted = sorted(torch.randperm(HIDDEN, generator=gen)[:PLANTED].tolist())
    net = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 5))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(HIDDEN, INPUTS, generator=gen))
        net[0].bias.fill_(-12.0)
        net[0].weight[planted] *= 0.3
        net[0].bias[planted] = 1.0
        net[2].weight.copy_(torch.randn(5, HIDDEN, generator=gen))
        mask = torch.zeros(HIDDEN, dtype=torch.bool)
        mask[planted] = True
        net[2].weight[:, ~mask] = 0.0
    return net, planted


def calib(seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(256, INPUTS, generator=gen), torch.zeros(256, dtype=torch.long))]


@pytest.mark.parametrize("method", ["ispasp", "pfp", "pfp-rand", "pfp-top", "gfs", "thinet"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_informed_methods_recover_planted_support(method, seed):
    net, planted = planted_net(seed)
    result = structprune.prune(net, calib(), method=method, budget=PLANTED / HIDDEN, progress=False)
    (layer,) = result.layers
    assert layer["kept"] == PLANTED
    assert torch.equal(result.model[0].weight, net[0].weight[planted])
    if method not in ("pfp-rand", "pfp-top"):  # these reweight the consumer: only the kept set is exact
        x = calib(seed + 10)[0][0]
        assert torch.allclose(result.model(x), net(x), atol=1e-5)
        assert layer["relative_residual"] < 1e-6


@pytest.mark.parametrize("proxy", ["contribution", "cosamp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ispasp_proxies_recover_planted_support(seed, proxy):
    net, planted = planted_net(seed)
    result = structprune.prune(net, calib(), method="ispasp", budget=PLANTED / HIDDEN, progress=False,
                               proxy=proxy, refit=False)
    assert torch.equal(result.model[0].weight, net[0].weight[planted])
    assert result.layers[0]["relative_residual"] < 1e-6


def test_contribution_statistics_match_the_explicit_contributions():
    """‖x_c‖ and ⟨x_c, R⟩ computed through the taps equal the ones from the explicit (rows, C, out) tensor."""
    from structprune.methods.base import ConsumerView
    from structprune.methods.ispasp import contribution_norms, residual_correlation

    gen = torch.Generator().manual_seed(0)
    consumer = ConsumerView("conv", inputs=torch.randn(50, 6, 9, generator=gen),
                            weight=torch.randn(4, 6, 9, generator=gen), bias=torch.randn(4, generator=gen),
                            output_scale=torch.rand(4, generator=gen) + 0.5)
    x = torch.einsum("mck,ock->mco", consumer.inputs, consumer.weight) * consumer.output_scale
    residual = torch.randn(50, 4, generator=gen)
    assert torch.allclose(contribution_norms(consumer, chunk=7), x.double().square().sum(dim=(0, 2)).sqrt(),
                          rtol=1e-5)
    assert torch.allclose(residual_correlation(consumer, residual, chunk=7),
                          torch.einsum("mco,mo->c", x, residual).double(), rtol=1e-4, atol=1e-4)


def test_magnitude_is_fooled_by_large_silent_units():
    """Guards the test above: with weights alone the planted set is not found."""
    net, planted = planted_net(0)
    result = structprune.prune(net, calib(), method="magnitude", budget=PLANTED / HIDDEN, progress=False)
    kept_rows = {tuple(row.tolist()) for row in result.model[0].weight}
    planted_rows = {tuple(net[0].weight[i].tolist()) for i in planted}
    assert kept_rows != planted_rows


def test_ispasp_residual_history_ends_at_the_reported_residual():
    net, _ = planted_net(3)
    result = structprune.prune(net, calib(), method="ispasp", budget=0.1, progress=False)
    (layer,) = result.layers
    assert 1 <= layer["iterations"] <= 20
    assert layer["residual_history"][-1] == pytest.approx(layer["relative_residual"], rel=1e-4)


def test_ispasp_cosamp_proxy_reconstructs_what_redundant_units_carried():
    """A linear hidden layer of 16 units on 6 inputs: any 8 units span the rest (with the consumer's bias),
    so CoSaMP's least-squares threshold returns weights that reproduce the dense output exactly, where a
    selection that keeps the original weights cannot."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 5))
    data = [(torch.randn(512, 6), torch.zeros(512, dtype=torch.long))]
    x = torch.randn(100, 6)
    residuals = {}
    for proxy in ("contribution", "cosamp"):
        result = structprune.prune(net, data, method="ispasp", budget=0.5, progress=False, proxy=proxy,
                                   refit=False)
        residuals[proxy] = result.layers[0]["relative_residual"]
        if proxy == "cosamp":
            assert torch.allclose(result.model(x), net(x), atol=1e-4)
            assert result.layers[0]["residual_history"][-1] < 1e-6
    assert residuals["cosamp"] < 1e-5 < 0.05 < residuals["contribution"]
