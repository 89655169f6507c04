"""Groups, consumers and surgery on the layer patterns structprune must handle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import structprune
from structprune import methods
from structprune.capture import capture
from structprune.graph import PruningGraph
from structprune.methods.base import Selection


def groups_of(model, shape):
    graph = PruningGraph(model.eval(), torch.randn(1, *shape))
    return graph, {g.name: g for g in graph.all_groups()}


def test_output_layer_is_never_a_group_and_first_layer_keeps_its_inputs():
    model = structprune.models.create("lenet5")
    graph, groups = groups_of(model, (1, 28, 28))
    assert list(groups) == ["conv1", "conv2", "fc1", "fc2"]  # shallow to deep, no fc3
    assert [graph.name_of(m) for m in graph.output_layers] == ["fc3"]
    result = structprune.prune(model, [torch.randn(8, 1, 28, 28)], budget=0.25, progress=False)
    assert result.model.conv1.in_channels == 1
    assert result.model.fc3.out_features == 10


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_the_graph_runs_the_model_once_and_counts_it_on_that_pass(name):
    from structprune.measure import count, counting

    model = structprune.models.create(name).eval()
    x = torch.randn(1, 1, 28, 28)
    calls = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape))
    graph = PruningGraph(model, x, observe=counting(model))
    assert calls == [x.shape]  # the trace, the layer order and the count share one pass on the batch as given
    assert graph.observed() == count(model, x)
    # the groups found on it are what a second search finds once the model changed
    first = graph.all_groups()[0]
    graph.apply(first, torch.arange(first.channels // 2))
    fresh = PruningGraph(model, x)
    assert [(g.name, g.channels) for g in graph.groups()] == [(g.name, g.channels) for g in fresh.groups()]


def test_conv_flatten_linear_maps_each_channel_to_its_spatial_features():
    model = structprune.models.create("lenet5")
    _, groups = groups_of(model, (1, 28, 28))
    (fc1,) = groups["conv2"].consumers
    assert fc1.name == "fc1" and fc1.channel_index.shape == (16, 25)
    assert torch.equal(fc1.channel_index[3], torch.arange(75, 100))


def test_residual_stream_couples_every_writer_and_reader():
    model = structprune.models.create("resnet20", in_channels=1)
    _, groups = groups_of(model, (1, 16, 16))
    stem = groups["conv1"]
    producers = {p.name for p in stem.producers}
    consumers = {c.name for c in stem.consumers}
    assert producers == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert consumers == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
                         "layer2.0.shortcut.0"}
    stage2 = groups["layer2.0.shortcut.0"]  # a 1x1 shortcut conv writes into the stream
    assert "layer2.0.shortcut.0" in {p.name for p in stage2.producers}


def test_bottleneck_and_depthwise_groups():
    bottleneck = structprune.models.create("resnet_cifar", depth=11, block="bottleneck", in_channels=1)
    _, groups = groups_of(bottleneck, (1, 16, 16))
    assert [c.name for c in groups["layer1.0.conv2"].consumers] == ["layer1.0.conv3"]
    mobilenet = structprune.models.create("mobilenetv2", width_mult=0.25, in_channels=1)
    _, groups = groups_of(mobilenet, (1, 16, 16))
    expand = next(g for g in groups.values() if "features.4.block.0" in {p.name for p in g.producers})
    # the depthwise conv carries the channels through; the 1x1 projection is the only consumer
    assert {p.name for p in expand.producers} == {"features.4.block.0", "features.4.block.3"}
    assert [c.name for c in expand.consumers] == ["features.4.block.6"]
    result = structprune.prune(mobilenet, [torch.randn(8, 1, 16, 16)], budget=0.5, progress=False)
    dw = result.model.features[4].block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == expand.channels // 2


def test_captured_rows_reproduce_the_consumer_output_including_batchnorm():
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, padding=1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    with torch.no_grad():
        model[3].running_var.uniform_(0.5, 2.0)
        model[3].weight.uniform_(0.5, 2.0)
    x = torch.randn(6, 2, 10, 10)
    graph, groups = groups_of(model, (2, 10, 10))
    view = capture(model, groups["0"], [x], memory_bytes=2**30)  # room for every position
    (consumer,) = view.consumers
    hidden = model[1](model[0](x))
    conv_out = model[2](hidden) * model[3].weight[None, :, None, None] \
        / torch.sqrt(model[3].running_var + model[3].eps)[None, :, None, None]
    expected = conv_out.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(consumer.output(), expected, atol=1e-5)


def test_capture_memory_bound_subsamples_positions():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(4 * 12 * 12, 2)).eval()
    x = torch.randn(10, 1, 12, 12)
    _, groups = groups_of(model, (1, 12, 12))
    view = capture(model, groups["0"], [x], memory_bytes=4 * 8 * 9 * 50)  # 50 rows' worth
    assert view.consumers[0].inputs.shape == (50, 8, 9)  # 5 positions from each of 10 samples


def test_apply_writes_replacement_consumer_weights_for_the_kept_channels():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    original = model[2].weight.detach().clone()
    graph, groups = groups_of(model, (6,))
    group = groups["0"]
    keep = torch.tensor([1, 3])
    new = torch.full((2, 2, 1), 7.0)
    graph.apply(group, keep, {"2": new})
    assert model[0].out_features == 2 and model[2].in_features == 2
    assert torch.equal(model[2].weight, torch.full((2, 2), 7.0))
    assert not torch.equal(original[:, keep], model[2].weight)


def _draws_until_distinct(prob: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """pfp-rand's sampling, as its definition reads: i.i.d. draws from ``prob`` (in blocks of max(keep, 16) from
    the generator) until ``keep`` distinct channels are drawn; the count of each channel."""
    counts = torch.zeros(len(prob), dtype=torch.long)
    while int((counts > 0).sum()) < keep:
        for j in torch.multinomial(prob, max(keep, 16), replacement=True, generator=generator).tolist():
            counts[j] += 1
            if int((counts > 0).sum()) == keep:
                break
    return counts


def test_pfp_rand_reweights_by_counts_over_draws_times_probability():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4)).eval()
    calib = [torch.randn(64, 10)]
    result = structprune.prune(model, calib, method="pfp-rand", budget=0.5, refit=False, progress=False)
    (layer,) = result.layers
    # the expected draws: the same sensitivities (every row of the calibration batch), the group's generator
    graph, groups = groups_of(copy.deepcopy(model), (10,))
    view = capture(graph.model, groups["0"], calib, sensitivity_samples=64, zero_below=methods.pfp.ZERO_BELOW)
    prob = methods.pfp.group_sensitivities(view) / methods.pfp.group_sensitivities(view).sum()
    counts = _draws_until_distinct(prob, 10, view.generator())
    draws = int(counts.sum())
    assert layer["draws"] == draws
    kept = counts.nonzero().flatten()
    kept_rows = [next(i for i in range(20) if torch.equal(model[0].weight[i], row))
                 for row in result.model[0].weight]
    assert kept_rows == kept.tolist()
    expected = (counts[kept] / (draws * prob[kept])).float()  # c_j / (m'·p_j), one factor per kept column
    assert torch.allclose(result.model[2].weight, model[2].weight[:, kept] * expected, rtol=1e-5, atol=0)
    assert not torch.allclose(expected, torch.ones_like(expected))


def test_selection_contract_is_enforced():
    class Broken(methods.MethodBase):
        name, calib_samples, needs = "broken", 8, methods.Needs(activations=False)

        def select(self, group, keep):
            return Selection(keep_idx=torch.arange(keep + 1))

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(RuntimeError, match="expected 3 indices"):
        structprune.prune(model, [torch.randn(8, 4)], method=Broken(), budget=0.5, progress=False)


class _ResNeXtBlock(nn.Module):
    """1×1 → grouped 3×3 → 1×1 with a residual add (ResNeXt's bottleneck), convolutions with biases."""

    def __init__(self, groups: int = 4, residual: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 3)
        self.residual = residual

    def forward(self, x):
        s = torch.relu(self.stem(x))
        h = torch.relu(self.bn1(self.reduce(s)))
        h = torch.relu(self.bn2(self.grouped(h)))
        h = self.expand(h) + (s if self.residual else 0)
        return self.head(torch.relu(h).mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("residual", [True, False])
def test_a_grouped_conv_is_pruned_in_whole_groups_and_computes_the_kept_channels(residual):
    """Every conv group keeps as many channels (the same positions of each), so groups= stays; without refit
    the pruned network equals the dense one with the removed channels' outputs zeroed."""
    torch.manual_seed(0)
    model, x = _randomised(_ResNeXtBlock(residual=residual)), torch.randn(16, 1, 8, 8)
    groups = {g.name: g for g in PruningGraph(model, x[:1]).all_groups()}
    assert groups["reduce"].channels == 4 and groups["reduce"].members.shape == (4, 4)  # 4 positions × 4 groups
    assert groups["reduce"].members[1].tolist() == [1, 5, 9, 13]
    result = structprune.prune(model, [x], "magnitude", {"reduce": 0.5, "grouped": 0.5, "*": 1.0}, refit=False,
                               recalibrate=False, progress=False)
    pruned = result.model
    assert pruned.grouped.groups == 4 and pruned.grouped.in_channels == pruned.grouped.out_channels == 8
    masked = copy.deepcopy(model)
    for conv, bn in (("reduce", "bn1"), ("grouped", "bn2")):
        kept = [int((getattr(model, conv).bias == b).nonzero()) for b in getattr(pruned, conv).bias]
        removed = torch.ones(16, dtype=torch.bool)
        removed[kept] = False
        per_group = removed.reshape(4, 4).sum(dim=1)
        assert per_group.tolist() == [2, 2, 2, 2]  # the same number from every conv group
        with torch.no_grad():
            getattr(masked, bn).weight[removed] = 0
            getattr(masked, bn).bias[removed] = 0
    assert torch.allclose(pruned(x), masked(x), atol=1e-5)


def test_grouped_convs_that_couple_every_channel_leave_the_group_whole():
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=4),
                          nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.Flatten(), nn.Linear(12 * 8 * 8, 3))
    with pytest.warns(UserWarning, match="group 2 is not pruned: the grouped convolutions 2, 3 couple its channels "
                                         "all together"):
        result = structprune.prune(model, [torch.randn(8, 1, 8, 8)], "magnitude", 0.5, progress=False)
    # the stem's channels feed one grouped conv: pruned in whole positions (2 of its 3 per group); the channels
    # between groups=4 (positions mod 3) and groups=3 (mod 4) are all tied together and stay
    assert result.model[0].out_channels == 8 and result.model[2].groups == 4
    assert result.model[2].out_channels == 12 and result.model[3].groups == 3


def test_a_grouped_consumer_is_left_as_the_method_chose_by_the_refit():
    torch.manual_seed(0)
    model, x = _randomised(_ResNeXtBlock()), torch.randn(16, 1, 8, 8)
    result = structprune.prune(model, [x], "ispasp", 0.5, progress=False)
    reduce = next(layer for layer in result.layers if layer["group"] == "reduce")
    assert "grouped convolution" in reduce["refit"]["grouped"]
    assert result.model.grouped.groups == 4 and result.model(x).shape == (16, 3)


def test_rows_stay_bounded_however_many_calibration_samples():
    """memory_bytes caps the captured rows even with far more samples than rows (each batch its share)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    graph = PruningGraph(net, torch.randn(1, 1, 12, 12))
    group = graph.all_groups()[0]
    batches = [torch.randn(100, 1, 12, 12) for _ in range(10)]
    rows_cap = 300
    view = capture(net, group, batches, memory_bytes=4 * 6 * 9 * rows_cap)
    assert rows_cap <= view.consumers[0].inputs.shape[0] <= rows_cap + len(batches)


def test_streamed_calibration_gives_the_same_result_and_rejects_a_shuffling_loader():
    torch.manual_seed(0)
    net = structprune.models.create("lenet5")
    images = torch.randn(200, 1, 28, 28)
    loader = [(images[i:i + 64], torch.zeros(len(images[i:i + 64]), dtype=torch.long)) for i in range(0, 200, 64)]
    for method in ("ispasp", "pfp", "taylor"):
        kept = structprune.prune(net, loader, method, 0.5, calib_samples=150, progress=False)
        streamed = structprune.prune(net, loader, method, 0.5, calib_samples=150, stream=True, progress=False)
        assert [entry["relative_residual"] for entry in kept.layers] == \
            [entry["relative_residual"] for entry in streamed.layers]
        for a, b in zip(kept.model.state_dict().values(), streamed.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)

    class Shuffled:
        def __iter__(self):
            order = torch.randperm(200)
            for i in range(0, 200, 50):
                yield images[order[i:i + 50]], torch.zeros(50, dtype=torch.long)

    with pytest.raises(structprune.StructPruneError, match="same samples every pass"):
        structprune.prune(net, Shuffled(), "ispasp", 0.5, stream=True, progress=False)


def test_the_graph_layer_knows_no_model_family():
    """Families are data (attention.py's layouts): graph.py imports nothing under models/, so the import structure
    has no circle through it."""
    import ast
    from pathlib import Path

    import structprune.graph

    tree = ast.parse(Path(structprune.graph.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if "models" in m.split(".")], imported


FRESH = """
import json, transformers, torch, structprune
config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)
torch.manual_seed(0)
model = transformers.BertModel(config).eval()
batch = {"input_ids": torch.randint(0, 30, (8, 7)), "attention_mask": torch.ones(8, 7, dtype=torch.long)}
result = structprune.prune(model, [batch], "magnitude", 0.5, progress=False)
print(json.dumps({"groups": [g["group"] for g in result.layers],
                  "heads": result.model.config.structprune_layers["encoder.layer.0.attention"]["heads"],
                  "macs": structprune.measure.count(model, batch)["macs"]}))
"""


def test_a_fresh_process_prunes_transformers_by_heads_with_nothing_else_imported():
    """`import structprune` loads its parts lazily: `structprune.prune` on a BERT must still find its heads and FFN
    groups (the layouts live in attention.py, which the graph imports), as in a process that imported models/."""
    import json
    import subprocess
    import sys

    from structprune import measure

    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["groups"] == ["encoder.layer.0.attention", "encoder.layer.0.intermediate",
                               "encoder.layer.1.attention", "encoder.layer.1.intermediate"]
    assert fresh["heads"] == 2  # the config follows the weights, as it must for saving
    namespace: dict = {}
    exec(FRESH.split("result =")[0], namespace)  # the same model here, where every module is loaded
    assert fresh["macs"] == measure.count(namespace["model"], namespace["batch"])["macs"]


def test_round_to_counts_the_layer_widths_of_grouped_channels():
    """A group channel of a grouped conv stands for one channel per conv group (4 here): round_to=8 keeps
    2 of them, 8 channels, instead of rounding 2 up to 8 group channels (everything)."""
    torch.manual_seed(0)
    model, x = _randomised(_ResNeXtBlock()), torch.randn(16, 1, 8, 8)
    result = structprune.prune(model, [x], "magnitude", {"reduce": 0.5, "*": 1.0}, round_to=8, progress=False)
    assert result.model.reduce.out_channels == 8 and result.model.grouped.in_channels == 8


def _same_group(a, b) -> bool:
    def layers(items):
        return [(i.name, i.module, i.channel_index.tolist()) for i in items]

    return (a.name == b.name and a.channels == b.channels and a.residual == b.residual
            and layers(a.producers) == layers(b.producers) and layers(a.batchnorms) == layers(b.batchnorms)
            and layers(a.consumers) == layers(b.consumers)
            and all(torch.equal(x.output_scale, y.output_scale) and torch.equal(x.output_shift, y.output_shift)
                    and x.normalized == y.normalized and x.batchnorm is y.batchnorm
                    for x, y in zip(a.consumers, b.consumers, strict=True))
            and (a.members is None) == (b.members is None)
            and (a.members is None or torch.equal(a.members, b.members)))


class _TwoIntoOne(nn.Module):
    """A concatenation: pruning one branch moves the other's offsets in the consumer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))))


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "mobilenetv2", "lenet5", "concat"])
def test_a_group_reused_between_removals_is_the_one_resolved_afresh(name):
    from conftest import make_zoo_model

    if name == "concat":
        torch.manual_seed(0)
        model, shape = _TwoIntoOne().eval(), (3, 8, 8)
    else:
        model, shape = make_zoo_model(name)
    example = torch.randn(1, *shape)
    graph = PruningGraph(model, example)
    before = {g.root: g for g in graph.all_groups()}  # every group resolved before any removal, as the Sizer does
    reused = []
    for group in graph.groups():
        fresh = graph._resolve(group.root, group.root_fn)
        assert _same_group(group, fresh), group.name
        reused.append(group is before[group.root])
        graph.apply(group, torch.arange(max(1, group.channels // 2)))
    assert any(reused) and (all(reused) or name != "vgg16")  # a chain of layers: every group reused
    assert not all(reused) or name in ("vgg16", "lenet5")  # elsewhere some removal moves another group's sizes
    model(torch.randn(2, *shape))


def _channel_table(idxs, root_idxs, channels):
    """The table written out channel by channel: what graph._channel_index computes at once."""
    rows = [[] for _ in range(channels)]
    for idx, root in zip(idxs, root_idxs, strict=True):
        if root is None or root >= channels:
            return None
        rows[root].append(idx)
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        return None
    return [sorted(r) for r in rows]


@pytest.mark.parametrize("case", range(40))
def test_channel_index_groups_each_channels_indices_in_order(case):
    from structprune.graph import _channel_index

    gen = torch.Generator().manual_seed(case)
    channels, width = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
    roots = torch.arange(channels).repeat_interleave(width)
    idxs = torch.randperm(channels * width * 3, generator=gen)[:channels * width]
    order = torch.randperm(len(roots), generator=gen) if case % 5 else torch.arange(len(roots))  # in order too
    roots, idxs = roots[order].tolist(), idxs[order].tolist()
    if case % 4 == 1:  # one channel with one index more: uneven
        roots, idxs = roots + [0], idxs + [channels * width * 3]
    elif case % 4 == 2:  # a root outside the group
        roots[0] = channels
    elif case % 4 == 3 and case % 8 == 3:
        roots[-1] = None
    expected = _channel_table(idxs, roots, channels)
    table = _channel_index(idxs, roots, channels)
    assert (table is None) == (expected is None)
    if expected is not None:
        assert table.tolist() == expected
