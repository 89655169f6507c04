"""The method contract (structprune.methods.Method): a user's own method written against it alone gets exactly what
its Needs declare, the calibration size its rule asks for, and nothing else is read of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from structprune import StructPruneError
from structprune.measure import output_sizes
from structprune.methods import MethodBase, Needs, Selection
from structprune.methods.pfp import PFP


class _Recorder(MethodBase):
    """Keeps the first channels and records what each group's view held."""

    name = "recorder"

    def __init__(self, needs: Needs, samples: int = 16):
        self.needs, self.samples, self.views, self.layer_outputs = needs, samples, [], None

    def calibration_samples(self, layer_outputs):
        self.layer_outputs = list(layer_outputs)
        return self.samples

    def select(self, group, keep):
        self.views.append(group)
        return Selection(keep_idx=torch.arange(keep))


class _CountingLoader:
    """A calibration loader that counts the batches it gives."""

    def __init__(self, batches):
        self.batches, self.given = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.given += 1
            yield batch


def _net_and_data(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 5 * 5, 4)).eval()
    gen = torch.Generator().manual_seed(seed)
    return net, [(torch.randn(8, 2, 5, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen))
                 for _ in range(4)]


def test_a_weights_only_method_without_recovery_reads_the_first_batch_only():
    net, data = _net_and_data()
    loader, method = _CountingLoader(data), _Recorder(Needs(activations=False))
    structprune.prune(net, loader, method, 0.5, refit=False, recalibrate=False, progress=False)
    assert loader.given == 1  # the example input, nothing more
    assert method.views and all(len(c.inputs) == 0 for v in method.views for c in v.consumers)
    assert all(p.weight_grad is None for v in method.views for p in v.producers)


def test_a_method_reading_activations_gets_its_own_number_of_samples_and_the_loader_is_read_once():
    net, data = _net_and_data()
    loader, method = _CountingLoader(data), _Recorder(Needs(), samples=16)
    result = structprune.prune(net, loader, method, 0.5, refit=False, recalibrate=False, progress=False)
    assert loader.given == 2  # 16 samples in batches of 8: read once, not once for the example and once more
    assert result.calib_samples == 16
    rows_samples = {int(c.row_sample.max()) + 1 for v in method.views for c in v.consumers}
    assert rows_samples == {16}
    assert all(c.sensitivity is None for v in method.views for c in v.consumers)


def test_calibration_samples_gets_the_layer_output_sizes():
    net, data = _net_and_data()
    method = _Recorder(Needs(), samples=8)
    structprune.prune(net, data, method, 0.5, progress=False)
    expected = [s["elements"] for s in output_sizes(net, data[0][0][:1]).values()]
    assert method.layer_outputs == expected == [8 * 25, 6 * 25, 4]


def test_needs_gradients_gives_the_loss_gradient_and_asks_for_labels():
    net, data = _net_and_data()
    method = _Recorder(Needs(gradients=True))
    structprune.prune(net, data, method, 0.5, refit=False, progress=False)
    first = method.views[0].producers[0]
    net.zero_grad()
    loss = sum(nn.functional.cross_entropy(net(x), y, reduction="mean") for x, y in data[:2])  # the first 16 samples
    loss.backward()
    assert torch.allclose(first.weight_grad, net[0].weight.grad.reshape(8, -1), atol=1e-6)
    with pytest.raises(StructPruneError, match="needs labelled calibration batches"):
        structprune.prune(net, [x for x, _ in data], _Recorder(Needs(gradients=True)), 0.5, progress=False)


class _ScoresKept(PFP):
    """PFP that keeps each group's sensitivities."""

    def __init__(self, zero_below: float):
        super().__init__("pfp", "top-k", zero_below=zero_below)
        self.kept = []

    def select(self, group, keep):
        self.kept.append(self.scores(group))
        return super().select(group, keep)


def test_needs_sensitivity_gives_pfps_sensitivities_with_the_methods_threshold():
    net, data = _net_and_data()
    for zero_below in (0.0, 0.5):
        mine = _Recorder(Needs(sensitivity=True, zero_below=zero_below), samples=16)
        structprune.prune(net, data, mine, 0.5, refit=False, progress=False)
        pfp = _ScoresKept(zero_below)
        structprune.prune(net, data, pfp, 0.5, refit=False, calib_samples=16, progress=False)
        # the first group is captured on the dense model by both (later ones follow different selections)
        got = torch.stack([c.sensitivity for c in mine.views[0].consumers]).amax(dim=0)
        assert torch.equal(got, pfp.kept[0])


def test_an_object_without_the_contract_is_refused_by_name():
    class OldStyle:
        name, calib_samples, data_informed = "old", 8, True

        def select(self, group, keep):
            return Selection(keep_idx=torch.arange(keep))

    net, data = _net_and_data()
    with pytest.raises(StructPruneError, match=r"does not implement structprune.methods.Method \(missing needs, "
                                               r"calibration_samples\); subclass structprune.methods.MethodBase"):
        structprune.prune(net, data, OldStyle(), 0.5, progress=False)
