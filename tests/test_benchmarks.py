"""Smoke tests of the benchmark harnesses' own logic (the benchmarks themselves are not part of the test run)."""

import sys
from pathlib import Path

import pytest
import torch

import structprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fmnist  # noqa: E402  (benchmarks/ is not a package)


def _calib(n=64):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen))
            for _ in range(n // 32)]


@pytest.mark.parametrize("arch,method,target", [("resnet20", "tp-magnitude", 0.5), ("resnet20", "tp-taylor", 0.5),
                                                ("resnet20", "tp-bn-scale", 0.5), ("resnet20", "tp-lamp", 0.5),
                                                ("lenet5", "tp-magnitude", 0.1)])
def test_torch_pruning_reference_meets_the_same_macs_target(arch, method, target):
    # lenet5 at 10%: MetaPruner leaves its 6-channel conv1 whole at ratios above 0.83 (87% of the MACs at 0.95),
    # so a plain bisection on [0, 0.95] would stop there
    torch.manual_seed(0)
    dense = structprune.models.create(arch, in_channels=1, num_classes=10).eval()
    calib = _calib()
    example = calib[0][0][:1]
    macs = structprune.measure.count(dense, example)["macs"]
    model, seconds = fmnist.torch_pruning(dense, calib, example, method, target, macs)
    pruned = structprune.measure.count(model, example)["macs"]
    assert (target - 0.05) * macs <= pruned <= target * macs  # just under the target, by the same counter
    assert seconds > 0
    assert model(example).shape == (1, 10)
    assert structprune.measure.count(dense, example)["macs"] == macs  # the dense model is untouched
    assert all(p.grad is None for p in model.parameters())


def _row(method, target, macs, before, after):
    return {"method": method, "family": "structprune", "target": target, "macs_ratio": macs, "params_ratio": macs,
            "prune_seconds": 1.0, "accuracy_pruned": before, "accuracy_finetuned": after}


def test_tables_apply_pfp_protocol_and_state_the_targets():
    rows = [_row("ispasp", 0.5, 0.5, 80.0, 91.0), _row("ispasp", 0.3, 0.3, 60.0, 90.6),
            _row("pfp", 0.5, 0.5, 75.0, 90.0), _row("pfp", 0.3, 0.3, 50.0, 88.0),
            _row("tp-magnitude", 0.5, 0.5, 68.0, 90.5), _row("tp-magnitude", 0.3, 0.3, 40.0, 87.0)]
    payload = {"meta": {"date": "d", "machine": "m", "torch": "t", "torch_pruning": "tp", "command": "c",
                        "calib_samples": 1280, "finetune": {"epochs": 1, "lr": 0.01, "schedule": "cosine",
                                                            "batch_size": 128}},
               "models": {"resnet20": {"checkpoint": "x.pt", "dense_accuracy": 91.0, "params": 1, "macs": 1,
                                       "finetune_images": 10, "test_images": 10, "rows": rows}}}
    text = fmnist.tables(payload)
    assert "| ispasp | 30.0% | 30.0% | 90.60 |" in text  # smallest within 0.5 points of 91.0
    assert "| pfp | none (the largest run, 50.0%: 90.00%) | | |" in text
    assert "ispasp ≥ Torch-Pruning magnitude + 10 points: 80.00% vs 68.00% (+12.00) — **met**" in text
    assert "pfp ≥ Torch-Pruning magnitude + 10 points: 75.00% vs 68.00% (+7.00) — **not met**" in text
    assert "(tp-magnitude, 90.50%): 91.00% — **met**" in text
    assert "(tp-magnitude, 90.50%): 90.00% — **not met**" in text


def test_speed_benchmark_times_on_the_device_it_is_given(monkeypatch):
    import speed

    batches = [speed.take_samples(batch, None, torch.device("meta"))  # how pruning_times moves its batches
               for batch in [(torch.zeros(2, 3), torch.zeros(2)), {"x": torch.zeros(1)}]]
    assert batches[0][0].device.type == batches[0][1].device.type == batches[1]["x"].device.type == "meta"
    def macs_time(model, reference, batch, min_pairs):  # a machine whose time is the MACs: no clock in a test
        size = [structprune.measure.count(m, batch[:1])["macs"] * len(batch) for m in (model, reference)]
        return {"ratio": size[0] / size[1], "reference_ms": size[1] * 1e-6, "model_ms": size[0] * 1e-6, "iqr": 0.0}

    monkeypatch.setattr(speed, "latency_ratio", macs_time)
    rows = speed.latencies(["lenet5"], speed.calibration(16), torch.device("cpu"))
    assert [(r["setting"], r["target"]) for r in rows] == [(s, f) for s, f, _ in speed.LATENCY_SETTINGS]
    for r in rows:
        assert abs(r["macs_ratio"] - r["target"]) < 0.05 and r["pairs"] == speed.PAIRS
        assert r["speedup_b64"] == pytest.approx(1 / r["macs_ratio"], rel=1e-6)  # the pruned model as timed
        assert r["speedup_target_b64"] == pytest.approx(speed.LATENCY_TARGET / r["macs_ratio"])
        assert r["met_b64"] == (r["speedup_b64"] >= r["speedup_target_b64"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["speed.py", "--device", "cuda", "--part", "latency"])
    with pytest.raises(SystemExit, match="CUDA is not available"):
        speed.main()


def test_lm_baselines_wanda_sp_and_flap_follow_their_definitions():
    """benchmarks/lm.py's no-update baselines, re-derived here on one FFN: Wanda-sp keeps the neurons of largest
    Σ|W_ij|·‖X_j‖₂, FLAP those of largest Var(X_j)·‖W_:,j‖², and FLAP's bias keeps the reader's mean output on the
    calibration tokens exactly (the removed neurons' mean contribution moved into it)."""
    transformers = pytest.importorskip("transformers")
    import lm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32)
    dense = lm.with_zero_biases(transformers.LlamaForCausalLM(config).eval())
    calib = [{"input_ids": torch.randint(1, 50, (4, 10), generator=torch.Generator().manual_seed(1))}]
    down = dense.model.layers[0].mlp.down_proj
    inputs = []
    handle = down.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        dense(**calib[0])
    handle.remove()
    x, w = inputs[0].double(), down.weight.double()
    expected = {"wanda-sp": (w.abs() * x.norm(dim=0)).sum(0), "flap": x.var(0) * w.square().sum(0)}
    for method in (lm.WandaSP(), lm.FLAP()):
        result = structprune.prune(dense, calib, method, {"*.mlp": 0.5}, calib[0], refit=False, progress=False)
        kept = result.model.model.layers[0].mlp.down_proj
        top = expected[method.name].topk(16).indices.sort().values
        torch.testing.assert_close(kept.weight.double(), w[:, top], rtol=0, atol=1e-6)
        if method.name == "flap":
            mean_pruned = (x[:, top] @ kept.weight.double().T).mean(0) + kept.bias.double()
            torch.testing.assert_close(mean_pruned, (x @ w.T).mean(0), rtol=0, atol=1e-5)
