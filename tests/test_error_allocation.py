"""Target(allocation="error") (issue 36, items 1–2): each group's curve of the network's output error with it
alone pruned to each candidate width, and the greedy search over the curves."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune import allocate, measure, widths


class _StubSizer:
    """Sizes of an allocation as a weighted sum of keep counts (costs that add up, as the greedy search assumes)."""

    def __init__(self, groups: dict[str, int], costs: dict[str, float]):
        self.groups, self.costs = groups, costs
        self.total = sum(c * costs[n] for n, c in groups.items())

    def fraction(self, keeps, _metric):
        return sum(keeps[n] * self.costs[n] for n in self.groups) / self.total


def test_greedy_search_finds_the_least_error_allocation_of_convex_curves():
    """With costs that add up and convex curves, narrowing the cheapest-per-unit group step by step is optimal at
    the size it stops at: checked against every allocation."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        groups = {f"g{i}": int(torch.randint(2, 6, (1,), generator=gen)) for i in range(3)}
        costs = {name: float(torch.rand(1, generator=gen)) + 0.1 for name in groups}
        curves = {}
        for name, channels in groups.items():  # convex, decreasing to 0 at full width
            scale = float(torch.rand(1, generator=gen)) + 0.01
            curves[name] = {w: scale * (channels - w) ** 2 for w in range(1, channels + 1)}
        sizer = _StubSizer(groups, costs)
        target = allocate.Target(float(torch.rand(1, generator=gen)) * 0.6 + 0.3)
        keeps = widths._narrow(target, sizer, curves)
        fraction = sizer.fraction(keeps, "flops")
        assert fraction <= target.fraction
        grown = widths._search_error(target, sizer, curves)  # then widened within the tolerance, never worse
        assert fraction <= sizer.fraction(grown, "flops") <= target.fraction * (1 + target.tolerance)
        assert sum(curves[n][grown[n]] for n in groups) <= sum(curves[n][keeps[n]] for n in groups)
        # the best allocation at a size no larger than the greedy one's, exhaustively
        best = min(sum(curves[n][w] for n, w in zip(groups, choice, strict=True))
                   for choice in itertools.product(*(range(1, c + 1) for c in groups.values()))
                   if sizer.fraction(dict(zip(groups, choice, strict=True)), "flops") <= fraction + 1e-12)
        assert sum(curves[n][keeps[n]] for n in groups) == pytest.approx(best, abs=1e-9), trial


def _two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_a_groups_curve_is_the_networks_output_error_with_it_alone_pruned_to_each_width(monkeypatch):
    """The curves: at each candidate width of the first group, the squared relative error of the network's output
    when that group alone is pruned there (measured here with prune itself, no recalibration, on the same
    calibration samples)."""
    seen = {}
    search = allocate._search_error

    def spy(budget, sizer, curves):
        seen.update(curves)
        return search(budget, sizer, curves)

    monkeypatch.setattr(allocate, "_search_error", spy)
    model, calib = _two_convs(), calibration((3, 8, 8), samples=64, batch=32)
    structprune.prune(model, calib, "ispasp", structprune.Target(0.5, allocation="error"), progress=False)
    assert set(seen) == {"0", "2"} and seen["0"][16] == 0.0 and len(seen["0"]) == 16
    x = torch.cat([b[0] for b in calib])
    for width in (3, 8, 13):
        alone = structprune.prune(model, calib, "ispasp", {"0": width / 16}, recalibrate=False, progress=False).model
        assert len(alone[0].weight) == width and len(alone[2].weight) == 16
        with torch.no_grad():
            dense, pruned = model(x), alone(x)
        expected = float((pruned - dense).square().sum() / dense.square().sum())
        assert seen["0"][width] == pytest.approx(expected, rel=1e-4), width


def test_error_allocation_meets_the_target_with_widths_of_its_own():
    model, shape = make_zoo_model("resnet20")
    calib = calibration(shape, samples=64, batch=32)
    result = structprune.prune(model, calib, "ispasp", structprune.Target(0.5, allocation="error"), progress=False)
    example = calib[0][0][:1]
    achieved = measure.count(result.model, example)["macs"] / measure.count(model, example)["macs"]
    assert abs(achieved - 0.5) <= 0.01 * 0.5
    assert result.budget["allocation"] == "error" and result.budget["predicted_error"]
    ratios = {layer["group"]: layer["kept"] / layer["channels"] for layer in result.layers}
    assert any(name.startswith("layer") and name.endswith("shortcut.0") or name == "conv1" for name in ratios)
    assert len({round(r, 3) for r in ratios.values()}) > 2  # not one ratio for all


def test_error_allocation_refuses_a_latency_target():
    with pytest.raises(structprune.StructPruneError, match="MACs or params target"):
        structprune.Target(0.5, "latency", allocation="error")
    assert structprune.Target(0.5, "params", allocation="error").allocation == "error"


def test_the_report_holds_the_uniform_widths_and_the_predicted_and_measured_error():
    """Item 4: beside the chosen widths, the uniform allocation at the same target (what prune with one ratio over
    the same groups keeps), the predicted error (the groups' curve values, summed) and the measured one (the pruned
    model's output error on the probe samples, recomputed here)."""
    model, calib = _two_convs(), calibration((3, 8, 8), samples=64, batch=32)
    result = structprune.prune(model, calib, "ispasp", structprune.Target(0.4, allocation="error"), progress=False)
    budget = result.budget
    predicted, total = budget["predicted_error"], budget["predicted_error_total"]
    if len(predicted) == len(result.layers):  # every chosen width on its curve
        assert total == pytest.approx(sum(predicted.values()))
    else:
        assert total is None
    uniform = structprune.prune(model, calib, "ispasp", structprune.Target(0.4), scope="all", progress=False)
    assert budget["uniform_keeps"] == {layer["group"]: layer["kept"] for layer in uniform.layers}
    x = torch.cat([b[0] for b in calib])
    with torch.no_grad():
        dense, pruned = model(x), result.model(x)
    assert budget["measured_error"] == pytest.approx(float((pruned - dense).square().sum() / dense.square().sum()),
                                                     rel=1e-4)
    assert "measured_error" not in uniform.budget and "uniform_keeps" not in uniform.budget


def test_info_shows_and_plots_the_widths_a_pruning_chose(tmp_path, capsys):
    from structprune import report
    from structprune.cli import main

    model, shape = make_zoo_model("lenet5")
    calib = calibration(shape, samples=64, batch=32)
    result = structprune.prune(model, calib, "ispasp", structprune.Target(0.4, allocation="error"), progress=False)
    path = structprune.save(result.model, tmp_path / "p.pt", extra={"report": result.to_dict()})
    assert main(["info", str(path), "--plot", str(tmp_path / "k.png")]) == 0
    out = capsys.readouterr().out
    kept = {layer["group"]: layer for layer in result.layers}
    for name, layer in kept.items():  # one row per group: channels, kept, share, uniform width, predicted error
        row = (f"| {name} | {layer['channels']} | {layer['kept']} | {100 * layer['kept'] / layer['channels']:.0f} | "
               f"{result.budget['uniform_keeps'][name]} |")
        assert row in out, row
    assert f"measured {result.budget['measured_error']:.2e}" in out and f"kept: {result.budget['chosen']}" in out
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["info", str(path), "--plot", str(tmp_path / "k.png")]) == 2  # kept unless --force
    assert "exists" in capsys.readouterr().err
    dense = structprune.save(model, tmp_path / "dense.pt")
    assert main(["info", str(dense), "--plot", str(tmp_path / "d.png")]) == 2
    assert "records no pruning report" in capsys.readouterr().err and not (tmp_path / "d.png").exists()
    assert report.allocation_table({"layers": []}) is None


def test_measured_widths_measures_the_network_at_that_many_widths_and_follows_the_refit_between(monkeypatch):
    """Target(measured_widths=N): N network evaluations per group, equal to the full curve's at those widths; the
    other widths scaled from the consumers' least-squares error by the measured ratio, log-linearly between."""
    from structprune import error_allocation

    calls, seen = [], []
    network = error_allocation._network_error
    search = allocate._search_error

    def count(run, name, *args):
        calls.append(name)
        return network(run, name, *args)

    def spy(budget, sizer, curves):
        seen.append(curves)
        return search(budget, sizer, curves)

    monkeypatch.setattr(error_allocation, "_network_error", count)
    monkeypatch.setattr(allocate, "_search_error", spy)
    model, calib = _two_convs(), calibration((3, 8, 8), samples=64, batch=32)
    structprune.prune(model, calib, "ispasp", structprune.Target(0.5, allocation="error"), progress=False)
    assert calls.count("0") == 15  # every width below 16
    calls.clear()
    budget = structprune.Target(0.5, allocation="error", measured_widths=3)
    structprune.prune(model, calib, "ispasp", budget, progress=False)
    assert calls.count("0") == 3 and calls.count("2") == 3
    full, anchored = seen
    anchors = error_allocation._anchors(list(range(1, 16)), 3)
    assert anchors == [4, 8, 11]  # evenly inside 1..15
    for width in anchors:
        assert anchored["0"][width] == pytest.approx(full["0"][width], rel=1e-6)
    assert sorted(anchored["0"]) == sorted(full["0"]) and anchored["0"][16] == 0.0
    assert all(anchored["0"][w] > 0 for w in range(1, 16))
    # the interpolation itself: geometric between two anchors, the nearest one's ratio outside
    network, local = {4: 8.0, 12: 0.5}, {4: 2.0, 8: 1.0, 12: 1.0, 2: 4.0, 14: 0.2}
    assert error_allocation._scale_at(8, network, local) == pytest.approx((4.0 * 0.5) ** 0.5)
    assert error_allocation._scale_at(2, network, local) == 4.0
    assert error_allocation._scale_at(14, network, local) == 0.5
    with pytest.raises(structprune.StructPruneError, match="measured_widths goes with"):
        structprune.Target(0.5, measured_widths=4)
    for bad in (0, True, 2.0):
        with pytest.raises(structprune.StructPruneError, match="measured_widths must be a positive integer"):
            structprune.Target(0.5, allocation="error", measured_widths=bad)


def test_candidate_widths_are_about_sixteen_multiples_of_the_groups_multiple():
    class Sizer(_StubSizer):
        def multiple(self, name, round_to):
            return round_to.get(name) if isinstance(round_to, dict) else round_to

    sizer = Sizer({"ffn": 1536, "narrow": 16, "odd": 100}, {"ffn": 1.0, "narrow": 1.0, "odd": 1.0})
    candidates = widths.error_widths(sizer, {"ffn": 16, "narrow": None, "odd": None})
    assert candidates["ffn"] == list(range(96, 1537, 96))  # 16 steps of 6 multiples, not 96 steps of one
    assert candidates["narrow"] == list(range(1, 17)) and candidates["odd"] == [*range(6, 100, 6), 100]
    assert widths.error_widths(sizer, None)["ffn"] == list(range(96, 1537, 96))


def test_the_candidate_allocations_are_checked_end_to_end_and_the_best_one_kept():
    """The error allocation, one ratio for every group and their blend, each pruned and recovered; the reported model
    is the one of least output error on the calibration samples after the probe's (recomputed here)."""
    model, calib = _two_convs(), calibration((3, 8, 8), samples=384, batch=128)
    result = structprune.prune(model, calib, "ispasp", structprune.Target(0.4, allocation="error"), progress=False)
    candidates = result.budget["candidates"]
    assert set(candidates) == {"error", "uniform", "blend"}
    chosen = result.budget["chosen"]
    eligible = [c for name, c in candidates.items() if c["within_target"] or name == "error"]
    assert candidates[chosen]["validation_error"] == min(c["validation_error"] for c in eligible)
    assert all(c["within_target"] == (abs(c["achieved"] - 0.4) <= 0.004) for c in candidates.values())
    assert candidates["blend"]["within_target"]  # scaled to the target, then grown group by group towards it
    held_out = calib[2][0]  # the probe reads the first 256 samples
    with torch.no_grad():
        dense, pruned = model(held_out), result.model(held_out)
    assert candidates[chosen]["validation_error"] == pytest.approx(
        float((pruned - dense).square().sum() / dense.square().sum()), rel=1e-4)
    kept = {layer["group"]: layer["kept"] for layer in result.layers}
    assert kept == candidates[chosen]["keeps"] and candidates["uniform"]["keeps"] == result.budget["uniform_keeps"]
    # a callback between groups runs once per group: the error allocation's own widths, no candidates
    calls = []
    once = structprune.prune(model, calib, "ispasp", structprune.Target(0.4, allocation="error"), progress=False,
                             after_group=lambda m, name: calls.append(name))
    assert "candidates" not in once.budget and sorted(calls) == ["0", "2"]


def test_the_output_the_error_is_measured_on_leaves_padding_out():
    """A padded position's output is read by nothing: with an attention mask among the inputs, the vector holds the
    real tokens' outputs only (those of the mask's ones, in order)."""
    from types import SimpleNamespace

    class Encoder(nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=input_ids[..., None].float() * torch.ones(1, 1, 2))

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    vector = measure.output_vector(Encoder(), {"input_ids": ids, "attention_mask": mask})
    assert vector.tolist() == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    plain = measure.output_vector(nn.Linear(3, 2), torch.ones(4, 3))
    assert plain.shape == (8,)


def test_heads_and_ffn_neurons_share_one_search_and_the_result_reloads(tmp_path, monkeypatch):
    """Item 3: a transformer's heads and FFN groups get curves in one search; whichever candidate is kept, the
    model saves and reloads (per-layer sizes in its config) with the same outputs."""
    transformers = pytest.importorskip("transformers")
    from conftest import BERT_VOCAB, BERT_WORDS, tiny_bert
    from structprune.models import hf

    seen = {}
    search = allocate._search_error
    monkeypatch.setattr(allocate, "_search_error", lambda b, s, curves: seen.update(curves) or search(b, s, curves))
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)})
    gen = torch.Generator().manual_seed(0)
    text = [" ".join(BERT_WORDS[int(i)] for i in torch.randint(0, len(BERT_WORDS), (9,), generator=gen))
            for _ in range(48)]
    batches = [dict(tokenizer(text[i:i + 24], padding=True, return_tensors="pt")) for i in (0, 24)]
    model = tiny_bert(layers=3)
    result = structprune.prune(model, batches, "ispasp", structprune.Target(0.5, allocation="error"), progress=False)
    assert {name.rsplit(".", 1)[-1] for name in seen} == {"attention", "intermediate"} and len(seen) == 6
    assert sorted(seen["encoder.layer.0.attention"]) == [1, 2, 3, 4]  # heads, one at a time
    ffn = sorted(seen["encoder.layer.0.intermediate"])  # neurons, in the device's multiple (8 or 16) where it fits
    assert ffn[-1] == 64 and len(ffn) >= 4 and all(w % ffn[0] == 0 for w in ffn)
    assert set(result.budget["candidates"]) == {"error", "uniform", "blend"}
    hf.save_pretrained(result.model, tmp_path / "pruned")
    back = hf.load_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(back(**batches[0]).last_hidden_state, result.model(**batches[0]).last_hidden_state)


def test_a_data_free_selection_without_recovery_still_reads_the_calibration_data_for_the_curves():
    model, calib = _two_convs(), calibration((3, 8, 8), samples=64, batch=32)
    result = structprune.prune(model, calib, "magnitude", structprune.Target(0.5, allocation="error"), refit=False,
                               recalibrate=False, progress=False)
    assert result.budget["allocation"] == "error" and result.budget["predicted_error"]
