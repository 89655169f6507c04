"""The default pipeline's recovery (refit, BatchNorm recalibration) and the fidelity of i-SpaSP and PFP
to their authors' formulations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune import methods
from structprune import refit as refit_module
from structprune.capture import capture
from structprune.graph import PruningGraph
from structprune.methods import base as base_module
from structprune.methods.base import ConsumerView, GroupView, Selection
from structprune.recalibrate import recalibrate_batchnorm


def _block(channels: int = 16, seed: int = 0) -> nn.Sequential:
    """conv1 → bn1 → relu → conv2 → bn2: the inside of a BasicBlock (3×3 convolutions with padding)."""
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                          nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                          nn.BatchNorm2d(channels))
    gen = torch.Generator().manual_seed(seed + 100)
    for bn in (block[1], block[4]):
        bn.running_mean.copy_(0.3 * torch.randn(channels, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=gen))
        bn.weight.data.copy_(0.5 + torch.rand(channels, generator=gen))
        bn.bias.data.copy_(0.5 * torch.randn(channels, generator=gen))
    return block.eval()


def _paper_ispasp(block: nn.Sequential, x: torch.Tensor, keep: int, iterations: int = 20) -> list[int]:
    """The released code's loop (prune_basic_block), written directly: H = relu(bn1(conv1 X)), the residual
    on bn2(conv2 H), its gradient with respect to H by autograd, ranking by Σ H over samples and positions."""
    conv2, bn2 = block[3], block[4]
    with torch.no_grad():
        hidden = block[2](block[1](block[0](x)))
        aggregate = hidden.sum(dim=(0, 2, 3))
    support: set[int] = set()
    for _ in range(iterations):
        h = hidden.clone().requires_grad_(True)
        dense = bn2(conv2(h))
        if support:
            idx = torch.tensor(sorted(support))
            with torch.no_grad():
                pruned = bn2(nn.functional.conv2d(h[:, idx], conv2.weight[:, idx], padding=1))
            objective = 0.5 * (dense - pruned).square().sum()
        else:
            objective = 0.5 * dense.square().sum()
        objective.backward()
        importance = h.grad.sum(dim=(0, 2, 3))
        omega = set(torch.argsort(importance, descending=True)[:2 * keep].tolist())
        merged = torch.tensor(sorted(omega | support))
        support = set(merged[torch.argsort(aggregate[merged], descending=True)[:keep]].tolist())
    return sorted(support)


def test_ispasp_matches_the_released_code_on_a_padded_basic_block():
    same = 0
    for seed in range(15):
        block = _block(seed=seed)
        x = torch.randn(24, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
        graph = PruningGraph(block, x[:1])
        (group,) = [g for g in graph.all_groups() if g.name == "0"]
        view = capture(block, group, [x])
        ours = methods.get("ispasp", proxy="paper").select(view, 5).keep_idx.tolist()
        same += ours == _paper_ispasp(block, x, 5)
    assert same == 15  # every seed


def test_ispasp_aggregate_activation_counts_each_position_once():
    block = _block()
    x = torch.randn(4, 16, 6, 6)
    graph = PruningGraph(block, x[:1])
    view = capture(block, graph.all_groups()[0], [x])
    with torch.no_grad():
        hidden = block[2](block[1](block[0](x)))
    assert torch.allclose(view.activation, hidden.sum(dim=(0, 2, 3)).double(), rtol=1e-5)


def _pfp_reference(x: torch.Tensor, weight: torch.Tensor, padding: int, channels: torch.Tensor,
                   zero_below: float = 0.0) -> torch.Tensor:
    """PFP's s_j straight from the definition, in float64: for every sample, output position, output unit
    and kernel tap, over the positive and negative parts of the input and of the weight; a sum counts as ≈ 0
    below ``zero_below`` × its unit's mean over the sample's positions."""
    x, weight = x.double(), weight.double()
    samples = len(x)
    out, cin, kh, kw = weight.shape
    patches = nn.functional.unfold(x, (kh, kw), padding=padding).transpose(1, 2).reshape(-1, cin, kh * kw)
    parts = [patches] if bool((patches >= 0).all()) else [patches.clamp(min=0), (-patches).clamp(min=0)]
    w = weight.reshape(out, cin, kh * kw)
    best = torch.zeros(len(channels), dtype=torch.float64)
    for a in parts:
        for wp in (w.clamp(min=0), (-w).clamp(min=0)):
            terms = a[:, None] * wp[None]  # (positions, out, cin, taps)
            total = terms.sum(dim=(2, 3), keepdim=True)
            per_sample = total.reshape(samples, -1, out)
            means = per_sample.mean(dim=1, keepdim=True).expand_as(per_sample).reshape(total.shape)
            g = torch.where((total > 1e-12) & (total > zero_below * means), terms / total.clamp(min=1e-12), 0.0)
            best = torch.maximum(best, g[:, :, channels].amax(dim=(0, 1, 3)))
    return best


class _Concat(nn.Module):
    """Two branches concatenated into one consumer: a group's denominators must include the other branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.consumer = nn.Conv2d(10, 5, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))

    def forward(self, x):
        return self.head(self.consumer(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)))


def test_pfp_sensitivities_match_the_definition_over_every_position_and_input_channel():
    torch.manual_seed(0)
    net = _Concat().eval()
    x = torch.randn(12, 3, 7, 7)
    graph = PruningGraph(net, x[:1])
    groups = {g.name: g for g in graph.all_groups()}
    with torch.no_grad():
        full_input = torch.cat([torch.relu(net.a(x)), net.b(x)], dim=1)
    for name, channels in (("a", torch.arange(6)), ("b", torch.arange(6, 10))):
        for zero_below in (0.0, 0.5):
            view = capture(net, groups[name], [x], memory_bytes=4096, sensitivity_samples=12,
                           zero_below=zero_below)  # few rows kept...
            assert len(view.consumers[0].inputs) < 12 * 49
            ours = methods.get("pfp").scores(view)  # ...but every position scored
            reference = _pfp_reference(full_input, net.consumer.weight.detach(), 1, channels, zero_below)
            assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-9)


def _stack(seed: int) -> nn.Module:
    """Issue 36's case: 3 → 16 → 32 padded 3×3 convolutions (the second reads every channel of the first)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_pfp_through_prune_is_the_definition_over_every_position_whatever_the_row_cap(monkeypatch):
    """The refit's captures keep a sample of the rows (here 7 of the 1,024 positions); PFP's sensitivity is the
    paper's maximum over every position of every sample all the same, in 30 of 30 seeds."""
    seen = {}
    scores = methods.pfp.PFP.scores

    def spy(self, group):
        seen[group.name] = scores(self, group)
        return seen[group.name]

    monkeypatch.setattr(methods.pfp.PFP, "scores", spy)
    for seed in range(30):
        net, x = _stack(seed), torch.randn(16, 3, 8, 8)
        structprune.prune(net, [x], "pfp", 0.5, example_inputs=x[:1], progress=False, zero_below=0.0,
                          memory_bytes=4096)
        with torch.no_grad():
            hidden = torch.relu(net[0](x))
        reference = _pfp_reference(hidden, net[2].weight.detach(), 1, torch.arange(16))
        assert torch.allclose(seen["0"], reference, rtol=1e-5, atol=1e-9), seed


def test_pfp_refuses_a_view_of_sampled_rows_rather_than_take_a_maximum_over_them():
    net, x = _stack(0), torch.randn(16, 3, 8, 8)
    group = {g.name: g for g in PruningGraph(net, x[:1]).all_groups()}["0"]
    sampled = capture(net, group, [x], memory_bytes=4096)  # no sensitivity_samples: rows only, 7 of 1,024
    assert not sampled.consumers[0].rows_complete
    with pytest.raises(structprune.StructPruneError, match="every position of every sample"):
        methods.get("pfp", zero_below=0.0).scores(sampled)
    whole = capture(net, group, [x[:2]])  # every row kept: the rows are the definition's
    assert whole.consumers[0].rows_complete and len(whole.consumers[0].inputs) == 2 * 64
    with torch.no_grad():
        hidden = torch.relu(net[0](x[:2]))
    reference = _pfp_reference(hidden, net[2].weight.detach(), 1, torch.arange(16))
    assert torch.allclose(methods.get("pfp", zero_below=0.0).scores(whole), reference, rtol=1e-5, atol=1e-9)


def test_pfp_sums_near_zero_for_their_image_do_not_make_a_channel_sensitive():
    """A channel that fires only, and faintly, where the rest of the image is empty (background) is alone in
    every sum it enters: g = 1 read literally; with ``zero_below`` those positions count as ≈ 0, and the channel
    that carries the image outranks it."""
    from structprune.sensitivity import conv_sensitivity

    x = torch.zeros(4, 3, 8, 8)
    x[:, 0, 2:6, 2:6] = 1.0 + torch.rand(4, 4, 4)  # the object
    x[:, 1, 2:6, 2:6] = 0.5 * torch.rand(4, 4, 4)  # a second channel on the object
    x[:, 2, :, :2] = 1e-3  # faint, and only on the background
    conv = nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(4, 3, 1, 1) + 0.1)
    index = torch.arange(3)[:, None]
    literal = conv_sensitivity(x, conv, index)
    assert float(literal[2]) == pytest.approx(1.0)  # the faint channel ties with the image's
    relative = conv_sensitivity(x, conv, index, zero_below=0.5)
    assert float(relative[2]) == 0.0 and float(relative[0]) > float(relative[1]) > 0
    assert torch.equal(relative[:2], literal[:2])  # the object's positions are unchanged


def test_pfp_rejects_a_zero_below_outside_zero_one():
    for bad in (-0.1, 1.0, 2, True, "0.5"):
        with pytest.raises(structprune.StructPruneError, match="zero_below"):
            methods.get("pfp", zero_below=bad)
    assert methods.get("pfp-top", zero_below=0).zero_below == 0.0


def test_prune_hands_pfp_zero_below_to_the_capture(monkeypatch):
    from structprune import pipeline

    seen = []
    real = pipeline.capture

    def spy(*args, **kwargs):
        seen.append((kwargs["sensitivity_samples"] > 0, kwargs["zero_below"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "capture", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    calib = [torch.randn(8, 3, 6, 6)]
    for options, expected in (({}, methods.pfp.ZERO_BELOW), ({"zero_below": 0.0}, 0.0)):
        seen.clear()
        structprune.prune(net, calib, "pfp", 0.5, example_inputs=calib[0][:1], progress=False, **options)
        assert seen and all(scored and value == expected for scored, value in seen)


def _dense_sensitivity(rows, weight, features, row_sample=None, zero_below=0.0):
    """PFP's (max, ×) product evaluated at every (row, output, feature), as the definition reads (a sum ≈ 0
    below ``zero_below`` × its unit's mean over the rows of its sample, one sample at a time)."""
    parts = [rows] if bool((rows >= 0).all()) else [rows.clamp(min=0), (-rows).clamp(min=0)]
    best = torch.zeros(features.numel())
    for part in parts:
        for w in (weight.clamp(min=0), (-weight).clamp(min=0)):
            total = part @ w.T
            limit = torch.full_like(total, 1e-12)
            if row_sample is not None:
                for sample in row_sample.unique():
                    rows_of = row_sample == sample
                    limit[rows_of] = torch.clamp(zero_below * total[rows_of].mean(dim=0), min=1e-12)
            inverse = torch.where(total > limit, 1 / total.clamp(min=1e-12), 0.0)
            m = (inverse[:, :, None] * w[:, features.reshape(-1)][None]).amax(dim=1)
            best = torch.maximum(best, (part[:, features.reshape(-1)] * m).amax(dim=0))
    return best.reshape(features.shape).amax(dim=1)


@pytest.mark.parametrize("dense_share", [2, 10**9])  # the bounded evaluation, and the every-pair fallback
def test_pfp_bounded_sensitivity_is_bit_identical_to_the_dense_definition(dense_share, monkeypatch):
    from structprune import sensitivity as pfp

    monkeypatch.setattr(pfp, "_DENSE_SHARE", dense_share)
    gen = torch.Generator().manual_seed(1)
    for trial in range(24):
        positions, channels, taps, extra, out = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in
                                                 ((1, 200), (1, 10), (1, 10), (0, 3), (1, 16)))
        rows = torch.randn(positions, (channels + extra) * taps, generator=gen)
        rows = rows.relu() if trial % 2 else rows  # post-ReLU inputs, and signed ones (GELU, heads)
        if trial % 5 == 0:
            rows[:, :taps] = 0  # a channel that never fires
        weight = torch.randn(out, rows.shape[1], generator=gen)
        weight = weight.relu() if trial % 3 == 0 else weight
        order = torch.randperm(channels + extra, generator=gen)[:channels]  # any subset, any order
        features = order[:, None] * taps + torch.arange(taps)
        reference = _dense_sensitivity(rows, weight, features)
        assert torch.equal(pfp.consumer_sensitivity(rows, weight, features), reference), trial
        # in two chunks with the first chunk's result as the running maximum: the same
        half = positions // 2
        first = pfp.consumer_sensitivity(rows[:half], weight, features) if half else None
        assert torch.equal(pfp.consumer_sensitivity(rows[half:], weight, features, floor=first), reference), trial
        # rows of a few samples, sums near their sample's zero left out: the bounds read the same inverses
        row_sample = torch.randint(0, 4, (positions,), generator=gen)
        reference = _dense_sensitivity(rows, weight, features, row_sample, 0.5)
        ours = pfp.consumer_sensitivity(rows, weight, features, row_sample=row_sample, zero_below=0.5)
        assert torch.allclose(ours, reference, rtol=1e-6, atol=0), trial


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                                  nn.Conv2d(6, 4, 3, padding=1, dilation=2), nn.Conv2d(6, 4, (1, 3), padding=(0, 1)),
                                  nn.Conv1d(6, 4, 5, padding=2), nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, stride=2)],
                         ids=["3x3", "stride", "dilation", "1x3", "conv1d", "1x1", "valid"])
def test_pfp_on_a_conv_input_equals_pfp_on_its_unfolded_rows(conv):
    from structprune.layers import all_rows
    from structprune.sensitivity import consumer_sensitivity, conv_sensitivity, conv_sensitivity_applies

    torch.manual_seed(0)
    assert conv_sensitivity_applies(conv)
    taps = conv.weight[0, 0].numel()
    weight = conv.weight.detach().reshape(len(conv.weight), -1)
    shape = (5, 6, 9, 9) if isinstance(conv, nn.Conv2d) else (5, 6, 11)
    for x in (torch.randn(shape).relu(), torch.randn(shape), torch.randn(shape).relu() ** 3):  # ≥ 0, signed, peaky
        for index in (torch.arange(6)[:, None], torch.tensor([[0, 3], [5, 1], [2, 4]]), torch.tensor([[4], [1]])):
            features = (index[:, :, None] * taps + torch.arange(taps)).reshape(len(index), -1)
            rows = consumer_sensitivity(all_rows(conv, x, "conv", None), weight, features)
            direct = conv_sensitivity(x, conv, index)
            assert torch.allclose(direct, rows, rtol=1e-5, atol=1e-7)
            half = conv_sensitivity(x[3:], conv, index, floor=conv_sensitivity(x[:3], conv, index))
            assert torch.allclose(half, rows, rtol=1e-5, atol=1e-7)  # in chunks, as the capture scores
            unfolded = all_rows(conv, x, "conv", None)  # sums ≈ 0 relative to their sample's mean
            row_sample = torch.arange(len(x)).repeat_interleave(len(unfolded) // len(x))
            rows = consumer_sensitivity(unfolded, weight, features, row_sample=row_sample, zero_below=0.5)
            assert torch.allclose(conv_sensitivity(x, conv, index, zero_below=0.5), rows, rtol=1e-5, atol=1e-7)


def test_pfp_conv_shortcut_leaves_out_what_max_pooling_cannot_pad():
    from structprune.sensitivity import conv_sensitivity_applies

    assert not conv_sensitivity_applies(nn.Conv2d(4, 4, 3, padding=2))  # padding more than half the kernel
    assert not conv_sensitivity_applies(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not conv_sensitivity_applies(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not conv_sensitivity_applies(nn.Conv2d(4, 4, 4, padding="same"))


def test_batchnorm_recalibration_writes_the_exact_statistics_of_the_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(n, 2, 9, 9) * 3 + 1 for n in (7, 16, 5)]  # unequal batches: no per-batch averaging
    tracked = net[1].num_batches_tracked.clone()
    info = recalibrate_batchnorm(net, batches)
    assert info == {"batchnorms": 2, "samples": 28}
    first = torch.cat([net[0](b) for b in batches]).detach().double()
    # the second BatchNorm's input, with the first normalising by each batch's own statistics
    second = torch.cat([net[3](torch.relu(nn.functional.batch_norm(
        net[0](b), None, None, net[1].weight, net[1].bias, training=True, eps=net[1].eps))) for b in batches])
    for bn, inputs in ((net[1], first), (net[4], second.detach().double())):
        assert torch.allclose(bn.running_mean.double(), inputs.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var.double(), inputs.var(dim=(0, 2, 3)), rtol=1e-4)
    assert not any(m.training for m in net.modules())
    assert torch.equal(net[1].num_batches_tracked, tracked)


class _OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm class of the user's own: recalibration may not assume torch's forward."""


def test_recalibration_of_a_batchnorm_subclass_measures_its_inputs_and_momentum_is_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), _OwnBatchNorm(4, momentum=None), nn.ReLU(), nn.Conv2d(4, 3, 3),
                        nn.BatchNorm2d(3, momentum=None), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=0.3)).eval()
    batches = [torch.randn(n, 2, 9, 9) * 3 + 1 for n in (7, 16, 5)]
    recalibrate_batchnorm(net, batches)
    first = torch.cat([net[0](b) for b in batches]).detach().double()
    assert torch.allclose(net[1].running_mean.double(), first.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var.double(), first.var(dim=(0, 2, 3)), rtol=1e-4)
    # a native BatchNorm whose momentum is None (a cumulative average) is read the same way
    second = torch.cat([net[3](torch.relu(nn.functional.batch_norm(
        net[0](b), None, None, net[1].weight, net[1].bias, training=True, eps=net[1].eps))) for b in batches])
    assert torch.allclose(net[4].running_mean.double(), second.detach().double().mean(dim=(0, 2, 3)), atol=1e-5)
    assert net[1].momentum is None and net[4].momentum is None and net[6].momentum == 0.3


def test_the_recalibration_reads_the_first_whole_batches_of_its_sample_count():
    model, shape = make_zoo_model("resnet20")
    calib = calibration(shape, samples=700, batch=100)
    default = structprune.prune(model, calib, "magnitude", 0.5, refit=False, progress=False)
    assert default.recalibration["samples"] == 600  # the first whole batches holding 512 (RECALIBRATION_SAMPLES)
    assert default.recovery_samples == 700
    few = structprune.prune(model, calib, "magnitude", 0.5, refit=False, recalibration_samples=150, progress=False)
    assert few.recalibration["samples"] == 200
    bare = structprune.prune(model, calib, "magnitude", 0.5, refit=False, recalibrate=False, progress=False)
    recalibrate_batchnorm(bare.model, calib[:2])  # what the pipeline does with the first 200 samples
    for a, b in zip(few.model.modules(), bare.model.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)
    with pytest.raises(structprune.StructPruneError, match="recalibration_samples"):
        structprune.prune(model, calib, "magnitude", 0.5, recalibration_samples=0, progress=False)


def test_recalibration_restores_training_mode_too():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    recalibrate_batchnorm(net, [torch.randn(8, 3)])
    assert all(m.training for m in net.modules())


def test_default_pipeline_refits_and_recalibrates_and_the_bare_step_does_neither():
    model, shape = make_zoo_model("resnet20")
    calib = calibration(shape, samples=64)
    default = structprune.prune(model, calib, "ispasp", 0.5, progress=False)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert default.refit and default.recalibration == {"batchnorms": batchnorms, "samples": 64}
    assert all("relative_residual_refit" in layer for layer in default.layers)
    bare = structprune.prune(model, calib, "ispasp", 0.5, refit=False, recalibrate=False, progress=False)
    assert not bare.refit and bare.recalibration is None
    assert all("relative_residual_refit" not in layer for layer in bare.layers)
    assert set(default.stages) == {"samples", "dense", "pruned", "recalibrated"} and default.stages["samples"] == 64
    assert set(bare.stages) == {"samples", "dense", "selected"}
    bn_default = dict(default.model.named_modules())["layer1.0.bn1"]
    bn_bare = dict(bare.model.named_modules())["layer1.0.bn1"]
    assert not torch.equal(bn_default.running_mean, bn_bare.running_mean)


def test_a_refit_shift_goes_into_the_batchnorm_so_later_groups_read_the_refitted_output():
    # the kept inputs are non-negative (after a ReLU), so removing channels lowers the layer's mean output: the
    # refit's bias change restores it, and for a conv without bias it must reach the BatchNorm's running mean
    # before the next group is captured, not only at the final recalibration
    block = _block()
    net = nn.Sequential(block, nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    calib = calibration((16, 8, 8), samples=64)
    x = torch.cat([batch for batch, _ in calib])
    result = structprune.prune(net, calib, "magnitude", {"0.0": 0.5, "*": 1.0}, recalibrate=False, progress=False)
    assert result.layers[0]["kept"] == 8 and result.layers[0]["refit"]["0.3"]["applied"]
    with torch.no_grad():
        dense_out, pruned_out = net[0](x), result.model[0](x)
    dense_mean, error_mean = dense_out.mean(dim=(0, 2, 3)), (pruned_out - dense_out).mean(dim=(0, 2, 3))
    assert error_mean.abs().max() < 0.02 * dense_out.std()  # the least-squares fit leaves no mean error
    assert not torch.allclose(result.model[0][4].running_mean, block[4].running_mean)  # it went into μ
    assert dense_mean.abs().max() > 0.1 * dense_out.std()  # (the check above is not vacuous)


def test_recovery_reads_more_samples_than_the_selection():
    model, shape = make_zoo_model("lenet5")
    calib = calibration(shape, samples=96)
    result = structprune.prune(model, calib, "pfp", 0.5, calib_samples=32, progress=False)
    assert result.calib_samples == 32 and result.recovery_samples == 96
    small = structprune.prune(model, calib, "pfp", 0.5, calib_samples=32, recovery_samples=48, progress=False)
    assert small.recovery_samples == 48


def test_refit_solves_the_least_squares_problem_over_many_row_chunks(monkeypatch):
    monkeypatch.setattr(base_module, "_CHUNK_ELEMENTS", 64)  # many chunks of a few rows
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 6, 4, generator=gen)
    weight = torch.randn(5, 6, 4, generator=gen)
    bias = torch.randn(5, generator=gen)
    consumer = ConsumerView("c", inputs, weight, bias, torch.ones(5))
    view = GroupView("g", 6, (consumer,), ())
    keep = torch.tensor([0, 2, 5])
    result = refit_module.refit(view, Selection(keep), ridge=1e-12)
    z = torch.cat([inputs[:, keep].reshape(300, -1), torch.ones(300, 1)], dim=1).double()
    y = (inputs.reshape(300, -1) @ weight.reshape(5, -1).T + bias).double()
    direct = torch.linalg.lstsq(z, y).solution
    assert torch.allclose(result.consumer_weights["c"].reshape(5, -1).double(), direct[:-1].T, atol=1e-4)
    assert torch.allclose(result.consumer_biases["c"].double(), direct[-1], atol=1e-4)


def test_refit_with_fewer_rows_than_inputs_stays_near_the_methods_weights():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 8, 5, generator=gen)  # 3 rows, 20 kept inputs: the rows do not determine W'
    weight = torch.randn(4, 8, 5, generator=gen)
    consumer = ConsumerView("c", inputs, weight, None, torch.ones(4))
    keep = torch.arange(4)
    fitted = refit_module.refit(GroupView("g", 8, (consumer,), ()), Selection(keep)).consumer_weights["c"]
    change = (fitted - weight[:, keep]).reshape(4, -1)
    assert change.abs().max() > 1e-3  # it did fit what the rows show...
    null = torch.linalg.svd(inputs[:, keep].reshape(3, -1), full_matrices=True).Vh[3:]
    assert (change @ null.T).abs().max() < 1e-5  # ...and left every direction they do not show as it was


def test_scope_inner_keeps_residual_streams_whole():
    model, shape = make_zoo_model("resnet20")
    result = structprune.prune(model, calibration(shape), "magnitude", 0.5, scope="inner", progress=False)
    skipped = {s["group"] for s in result.skipped if "scope='inner'" in s["reason"]}
    assert skipped == {"conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"}
    for name, module in result.model.named_modules():
        if isinstance(module, nn.Conv2d) and name.endswith("conv2"):
            assert module.out_channels == dict(model.named_modules())[name].out_channels
        if isinstance(module, nn.Conv2d) and name.endswith("conv1") and name != "conv1":
            assert module.out_channels < dict(model.named_modules())[name].out_channels


def test_scope_must_be_known():
    model, shape = make_zoo_model("lenet5")
    with pytest.raises(structprune.StructPruneError, match="scope must be one of auto, all, inner"):
        structprune.prune(model, calibration(shape), "magnitude", 0.5, scope="outer", progress=False)


class _CountingLoader:
    """Batches that count how many samples were read from them."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __iter__(self):
        for x, y in self.batches:
            self.read += len(x)
            yield x, y


def test_a_weights_only_selection_without_recovery_reads_no_data():
    model, shape = make_zoo_model("resnet20")
    loader = _CountingLoader(calibration(shape, samples=64))
    bare = structprune.prune(model, loader, "magnitude", 0.5, example_inputs=torch.zeros(1, *shape), refit=False,
                             recalibrate=False, progress=False)
    assert loader.read == 0 and bare.calib_samples == 0 and bare.recovery_samples == 0 and bare.stages is None
    assert bare.after["macs"] < bare.before["macs"]
    without_example = structprune.prune(model, loader, "magnitude", 0.5, refit=False, recalibrate=False,
                                        progress=False)
    assert loader.read <= 16  # one batch, for the example input only
    assert torch.equal(without_example.model.layer1[0].conv1.weight, bare.model.layer1[0].conv1.weight)
    default = structprune.prune(model, loader, "magnitude", 0.5, progress=False)  # the refit and the BN statistics
    assert default.recovery_samples == 64 and set(default.stages) == {"samples", "dense", "pruned", "recalibrated"}


def test_the_refit_reads_rows_per_kept_input_as_the_capture_reads_them_per_captured_input(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    inputs, weight = torch.randn(200, 4, 3, generator=gen), torch.randn(5, 4, 3, generator=gen)

    def view(rows) -> ConsumerView:
        return ConsumerView(name="c", inputs=rows, weight=weight, bias=None, output_scale=torch.ones(5))

    keep = torch.tensor([0, 2])
    strided, direct = view(inputs).normal_equations(keep, stride=3), view(inputs[::3]).normal_equations(keep)
    assert torch.equal(strided.gram, direct.gram) and torch.equal(strided.cross, direct.cross)
    assert strided.gram[-1, -1] == 67  # the constant column counts the rows
    strides = []
    real = ConsumerView.normal_equations
    monkeypatch.setattr(ConsumerView, "normal_equations",
                        lambda self, idx, stride=1: strides.append(stride) or real(self, idx, stride))
    monkeypatch.setattr(structprune.capture, "ROWS_PER_FEATURE", 4)
    group = GroupView(name="g", channels=4, consumers=(view(inputs),), producers=())
    refit_module.refit(group, Selection(keep))  # 6 kept inputs: 24 rows wanted of 200, every 8th
    monkeypatch.setattr(structprune.capture, "ROWS_PER_FEATURE", 0)  # 0: every row
    refit_module.refit(group, Selection(keep))
    assert strides == [8, 1]
