"""Every zoo model prunes with every method, gets smaller, and survives save -> load in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import structprune
from conftest import ZOO, calibration, make_zoo_model, prune_keeping_everything

METHODS = structprune.methods.available()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_prunes_at_half_with_every_method(name, method):
    model, shape = make_zoo_model(name)
    x = torch.randn(4, *shape)
    result = structprune.prune(model, calibration(shape), method=method, budget=0.5, progress=False)
    out = result.model(x)
    assert out.shape == model(x).shape
    assert torch.isfinite(out).all()
    assert result.after["params"] < result.before["params"]
    assert result.after["macs"] < result.before["macs"]
    assert result.layers and all(layer["kept"] <= (layer["channels"] + 1) // 2 + 1 for layer in result.layers)
    assert result.model is not model and model(x).shape == out.shape  # the input model is untouched


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_one_keeps_every_channel_and_the_outputs(name):
    model, shape = make_zoo_model(name)
    x = torch.randn(4, *shape)
    for method in ("ispasp", "pfp-rand"):
        result = structprune.prune(model, calibration(shape), method=method, budget=1.0, progress=False)
        assert result.after == result.before
        assert all(layer["kept"] == layer["channels"] for layer in result.layers)
    for method in ("ispasp", "pfp"):  # (pfp-rand would reweight all channels: prune() leaves a whole group alone)
        # every stage taken with every channel kept (capture, selection, refit, weights written, removal): the
        # same function
        kept_all = prune_keeping_everything(model, calibration(shape, samples=256, batch=64), method)
        with torch.no_grad():
            assert torch.allclose(kept_all(x), model(x), rtol=1e-5, atol=1e-6)


def test_ratio_close_to_one_rounds_up_to_every_channel():
    assert structprune.keep_count(16, 0.99) == 16
    assert structprune.keep_count(10, 0.3) == 3
    assert structprune.keep_count(7, 0.01) == 1


def test_input_model_is_not_modified():
    model, shape = make_zoo_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structprune.prune(model, calibration(shape), method="pfp-rand", budget=0.3, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["ispasp", "pfp-rand"])
def test_save_then_load_in_a_fresh_process_gives_identical_outputs(tmp_path, method):
    cases = {}
    for name in sorted(ZOO):
        model, shape = make_zoo_model(name)
        result = structprune.prune(model, calibration(shape), method=method, budget=0.5, progress=False)
        x = torch.randn(3, *shape)
        path = tmp_path / f"{name}.pt"
        structprune.save(result, path)
        torch.save({"x": x, "y": result.model(x).detach()}, tmp_path / f"{name}.io.pt")
        cases[name] = str(path)
    script = (
        "import json, sys, torch, structprune\n"
        "cases = json.loads(sys.argv[1])\n"
        "report = {}\n"
        "for name, path in cases.items():\n"
        "    model = structprune.load(path)\n"
        "    io = torch.load(path.replace('.pt', '.io.pt'))\n"
        "    with torch.no_grad():\n"
        "        y = model(io['x'])\n"
        "    report[name] = [list(y.shape) == list(io['y'].shape) and torch.equal(y, io['y']),\n"
        "                    sum(p.numel() for p in model.parameters())]\n"
        "print(json.dumps(report))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(ZOO)
    for name, (identical, params) in report.items():
        assert identical, name
        model, _ = make_zoo_model(name)
        assert params < sum(p.numel() for p in model.parameters())


def test_saving_refuses_to_overwrite_without_force(tmp_path):
    model, shape = make_zoo_model("lenet300")
    path = tmp_path / "model.pt"
    structprune.save(model, path)
    stamp = path.read_bytes()
    with pytest.raises(structprune.StructPruneError, match="already exists"):
        structprune.save(model, path)
    assert path.read_bytes() == stamp
    structprune.save(model, path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


@pytest.mark.parametrize("method", ["ispasp", "pfp-rand", "random"])
def test_same_seed_gives_the_same_selection(method):
    model, shape = make_zoo_model("resnet20")
    runs = [structprune.prune(model, calibration(shape), method=method, budget=0.4, seed=7, progress=False)
            for _ in range(2)]
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [layer["kept"] for layer in runs[0].layers] == [layer["kept"] for layer in runs[1].layers]


def test_pruning_a_pruned_model_again_saves_and_loads(tmp_path):
    model, shape = make_zoo_model("resnet20")
    first = structprune.prune(model, calibration(shape), method="ispasp", budget=0.75, progress=False)
    second = structprune.prune(first.model, calibration(shape), method="pfp", budget=0.75, progress=False)
    assert second.after["params"] < first.after["params"] < first.before["params"]
    path = tmp_path / "twice.pt"
    structprune.save(second, path)
    loaded = structprune.load(path)
    x = torch.randn(2, *shape)
    assert torch.equal(loaded(x), second.model(x))
    assert len(loaded.structprune_history) == len(second.model.structprune_history) > \
        len(first.model.structprune_history) > 0
