"""Resumed passes (structprune.activation_cache): a capture that starts at a kept block input gives what the whole pass
gives, runs the early blocks once rather than once per group, and never resumes where that would be wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune import pipeline
from structprune.activation_cache import ActivationCache, Chain


def _prune(model, calib, method, monkeypatch=None, **options):
    if monkeypatch is not None:
        monkeypatch.setattr(pipeline, "_caches", lambda *args, **kwargs: (None, None))
    return structprune.prune(model, calib, method, 0.5, progress=False, **options)


def _assert_same(a: structprune.PruneResult, b: structprune.PruneResult) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].shape == sb[name].shape, name
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [layer["relative_residual"] for layer in a.layers] == pytest.approx(
        [layer["relative_residual"] for layer in b.layers], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name,method,options", [
    ("resnet20", "ispasp", {}),
    ("resnet56", "pfp", {"refit": False, "recalibrate": False}),
    ("vgg16", "ispasp", {}),  # no residual stream: the refit targets the original model, through its own cache
    ("mobilenetv2", "thinet", {}),
])
def test_resumed_captures_give_the_same_pruned_model(monkeypatch, name, method, options):
    model, shape = make_zoo_model(name)
    calib = calibration(shape, samples=32, batch=8)
    resumed = _prune(model, calib, method, **options)
    whole = _prune(model, calib, method, monkeypatch, **options)
    _assert_same(resumed, whole)


def test_pfp_allocation_resumes_too(monkeypatch):
    model, shape = make_zoo_model("resnet20")
    calib = calibration(shape, samples=32, batch=8)
    budget = structprune.Target(0.5, allocation="pfp")
    resumed = structprune.prune(model, calib, "pfp", budget, progress=False)
    monkeypatch.setattr(pipeline, "_caches", lambda *args, **kwargs: (None, None))
    whole = structprune.prune(model, calib, "pfp", budget, progress=False)
    _assert_same(resumed, whole)


def _samples_through_first_block(model, calib, method, monkeypatch=None) -> int:
    """Samples that the first residual block of the pruned copy computes on over the whole pruning (a block
    resumed past returns the kept input without running its layers)."""
    samples = []
    deepcopy = pipeline.copy.deepcopy

    def copy_with_counter(obj, *args):
        copied = deepcopy(obj, *args)
        if obj is model:
            copied.layer1[0].conv1.register_forward_pre_hook(lambda _module, args: samples.append(len(args[0])))
        return copied

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.copy, "deepcopy", copy_with_counter)
        _prune(model, calib, method, monkeypatch, refit=False, recalibrate=False, scope="inner")
    return sum(samples)


def test_early_blocks_run_once_not_once_per_group(monkeypatch):
    model, shape = make_zoo_model("resnet56")
    calib = calibration(shape, samples=32, batch=8)
    groups = 27  # the inner groups, one per residual block
    resumed = _samples_through_first_block(model, calib, "ispasp")
    whole = _samples_through_first_block(model, calib, "ispasp", monkeypatch)
    assert whole >= groups * 32  # every capture passes the first block
    # two passes over the calibration samples (the first capture, the accuracy of the pruned model), and per
    # group a few single-sample passes (the check that the pruned model still runs, the check of a new cut)
    assert resumed <= 2 * 32 + 4 * groups


class _SkipAcross(nn.Module):
    """Blocks in a chain, but the first block's output is also read after the last (a U-Net's skip)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        skip = self.down(self.stem(x))
        return self.head(torch.cat([self.up(self.mid(skip)), skip], dim=1))


def test_a_cut_a_kept_tensor_crosses_is_never_used(monkeypatch):
    torch.manual_seed(0)
    model = _SkipAcross().eval()
    example = torch.randn(1, 1, 8, 8)
    chain = Chain(model, example)
    names = [call.name for call in chain.nodes]
    assert names == ["stem", "down.0", "down.1", "mid.0", "mid.1", "up.0", "up.1"]
    assert chain.usable(model, example, names.index("mid.0"))  # the kept input is `skip` itself
    for later in ("mid.1", "up.0", "up.1"):  # `skip` would be the kept input of a later block
        assert not chain.usable(model, example, names.index(later))
    calib = calibration((1, 8, 8), samples=16, batch=8)
    _assert_same(_prune(model, calib, "ispasp"), _prune(model, calib, "ispasp", monkeypatch))


def test_a_change_before_the_cut_drops_the_kept_inputs():
    model, shape = make_zoo_model("resnet20")
    example = torch.randn(1, *shape)
    chain = Chain(model, example)
    cache = ActivationCache(model, chain, example, samples=8, limit_bytes=2**30)
    cut = [call.name for call in chain.nodes].index("layer2.0")
    cache.cut, cache.values = cut, [torch.zeros(1)]
    cache.changed(["layer2.0.conv1", "layer3.1.bn2"])  # in and after the block: the kept inputs still hold
    assert cache.cut == cut
    cache.changed(["layer1.2.conv2"])
    assert cache.cut is None and cache.values == []


def test_nothing_is_kept_beyond_the_memory_bound():
    model, shape = make_zoo_model("resnet20")
    example = torch.randn(1, *shape)
    chain = Chain(model, example)
    cache = ActivationCache(model, chain, example, samples=1000, limit_bytes=1024)
    assert cache.plan(["layer2.1.conv1"], ["layer2.0.conv2"]) == (None, None)
    roomy = ActivationCache(model, chain, example, samples=1000, limit_bytes=2**30)
    assert roomy.plan(["a.layer.that.never.ran"]) == (None, None)  # placed after every block: nothing to keep
    assert roomy.plan(["layer2.1.conv1"], ["layer2.0.conv2"])[1] == [c.name for c in chain.nodes].index("layer2.0")


def test_a_pruned_producer_is_not_run_again_on_every_batch_of_the_next_pass():
    """Block k's conv1 reads the block's own input: after its group's removal, the pass that resumes at block k
    takes the kept rows of what conv1 computed in the group's own capture, after checking one batch."""
    model, shape = make_zoo_model("resnet56")
    calib = calibration(shape, samples=32, batch=8)  # 4 batches
    name = "layer2.3.conv1"
    channels = model.get_submodule(name).out_channels
    runs = []  # (out_channels, batch) of every run of that layer of the model being pruned, during the captures
    capturing = [False]
    real_forward, real_capture = nn.Conv2d.forward, pipeline.capture

    def forward(self, x):
        if capturing[0] and getattr(self, "_watched", False):
            runs.append((self.out_channels, x.shape[0]))
        return real_forward(self, x)

    def capture(model, *args, **kwargs):
        model.get_submodule(name)._watched = True
        capturing[0] = True
        try:
            return real_capture(model, *args, **kwargs)
        finally:
            capturing[0] = False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nn.Conv2d, "forward", forward)
        patch.setattr(pipeline, "capture", capture)
        result = structprune.prune(model, calib, "ispasp", 0.5, scope="inner", progress=False)
    assert runs.count((channels, 8)) == 4  # its own group's capture: every batch
    assert runs.count((channels // 2, 8)) == 1  # the next group's pass: the first batch only, to check the rows
    assert result.model.get_submodule(name).out_channels == channels // 2


def test_a_producer_whose_kept_output_no_longer_matches_runs_again():
    from structprune.activation_cache import _taking

    full, rows = nn.Conv2d(2, 4, 1), torch.tensor([0, 2])
    pruned = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        pruned.weight.copy_(full.weight[rows])
        pruned.bias.copy_(full.bias[rows])
        x = torch.randn(3, 2, 5, 5)
        recorded = [full(x)]
        with _taking({pruned: (recorded, rows, 1)}, lambda: 0):
            assert torch.equal(pruned(x), recorded[0][:, rows]) and torch.equal(pruned(x), recorded[0][:, rows])
        stale = [full(x) + 1.0]  # as if its input had changed since it was recorded
        with _taking({pruned: (stale, rows, 1)}, lambda: 0):
            computed = nn.Conv2d.forward(pruned, x)
            assert torch.equal(pruned(x), computed)  # the check finds the difference
            assert torch.equal(pruned(x), computed)  # and the layer runs from then on
        assert "forward" not in vars(pruned)
