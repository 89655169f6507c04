"""Schedules (oneshot, sequential, cascade) and fine-tuning with per-epoch state and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import calibration, make_zoo_model
from structprune import StructPruneError, Target, schedule
from structprune.finetune import TrainConfig, train


def test_cascade_three_steps_report_decreasing_sizes():
    model, shape = make_zoo_model("resnet20")
    final, steps, results = schedule.run(model, calibration(shape), "ispasp", Target(0.4), schedule="cascade",
                                         steps=3, progress=False)
    assert [s["step"] for s in steps] == [1, 2, 3]
    macs = [s["macs"] for s in steps]
    assert macs[0] > macs[1] > macs[2]
    assert steps[-1]["macs_ratio"] == pytest.approx(0.4, abs=0.03)
    assert results[-1].model is final


def test_cascade_fine_tunes_and_evaluates_after_each_step():
    model, shape = make_zoo_model("lenet5")
    tuned = []
    _, steps, _ = schedule.run(model, calibration(shape), "magnitude", 0.25, schedule="cascade", steps=2,
                               finetune=lambda m: tuned.append(m), evaluate=lambda m: 42.0, progress=False)
    assert len(tuned) == 2 and all("finetune_seconds" in s and s["accuracy_finetuned"] == 42.0 for s in steps)
    assert steps[1]["params"] < steps[0]["params"]


def test_sequential_fine_tunes_after_every_group():
    model, shape = make_zoo_model("lenet5")
    calls = []
    final, steps, results = schedule.run(model, calibration(shape), "ispasp", 0.5, schedule="sequential",
                                         layer_finetune=lambda m: calls.append(sum(p.numel() for p in m.parameters())),
                                         progress=False)
    assert len(calls) == len(results[0].layers) == 4
    assert calls == sorted(calls, reverse=True)  # the model shrinks group by group
    with pytest.raises(StructPruneError, match="layer_finetune"):
        schedule.run(model, calibration(shape), "ispasp", 0.5, schedule="sequential", progress=False)


def _mlp_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, TensorDataset(x, y)


def _loader(dataset):
    return DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))


def _interrupt_after(calls: int):
    """A forward hook that raises KeyboardInterrupt at its ``calls``-th call."""
    seen = {"n": 0}

    def interrupt(*_):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt

    return interrupt


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    config = TrainConfig(epochs=3, lr=0.1, warmup_epochs=0.5, schedule="step", label_smoothing=0.1)
    reference, data = _mlp_and_data()
    torch.manual_seed(123)
    ref_losses = train(reference, _loader(data), config, progress=False)

    model, _ = _mlp_and_data()
    state = tmp_path / "run.state"
    handle = model.register_forward_hook(_interrupt_after(6 + 3))  # 6 batches per epoch: killed in epoch 2
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        train(model, _loader(data), config, progress=False, state_path=state)
    handle.remove()
    assert state.exists()

    resumed, _ = _mlp_and_data(seed=99)  # different start: everything must come from the state file
    losses = train(resumed, _loader(data), config, progress=False, state_path=state, resume=True)
    assert losses == ref_losses
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not state.exists()  # removed once training ends


def test_resume_with_other_options_is_refused(tmp_path):
    model, data = _mlp_and_data()
    state = tmp_path / "run.state"
    handle = model.register_forward_hook(_interrupt_after(6 + 1))  # killed in the second epoch: one state saved
    with pytest.raises(KeyboardInterrupt):
        train(model, _loader(data), TrainConfig(epochs=2), progress=False, state_path=state)
    handle.remove()
    assert state.exists()
    with pytest.raises(StructPruneError, match="other training options"):
        train(model, _loader(data), TrainConfig(epochs=2, lr=0.5), progress=False, state_path=state, resume=True)
    state.write_bytes(b"truncated")
    with pytest.raises(StructPruneError, match=r"state .*run.state is not readable \(truncated or corrupted\?\)"):
        train(model, _loader(data), TrainConfig(epochs=2), progress=False, state_path=state, resume=True)


def test_step_schedule_and_warmup_factors():
    config = TrainConfig(epochs=4, lr=1.0, schedule="step", warmup_epochs=1)
    factors = [config.lr_factor(step, 10) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[5] == pytest.approx(0.55)
    assert factors[15] == 1.0 and factors[25] == pytest.approx(0.1) and factors[35] == pytest.approx(0.01)
    with pytest.raises(StructPruneError, match="schedule must be"):
        TrainConfig(schedule="linear")
