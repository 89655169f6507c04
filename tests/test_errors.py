"""Bad input gets one clear error naming the argument, from the API and from the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune
from structprune import StructPruneError
from structprune.cli import main


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


CALIB = [torch.randn(8, 4)]


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), "half", True])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(StructPruneError, match=r"ratio must be in \(0, 1\]"):
        structprune.prune(mlp(), CALIB, budget=ratio, progress=False)


def test_unknown_method_and_option():
    with pytest.raises(StructPruneError, match="method must be one of .*ispasp.*got 'obs'"):
        structprune.prune(mlp(), CALIB, method="obs", progress=False)
    with pytest.raises(StructPruneError, match="no option iters.*iterations"):
        structprune.prune(mlp(), CALIB, method="ispasp", iters=3, progress=False)
    with pytest.raises(StructPruneError, match="iterations must be a positive integer"):
        structprune.methods.get("ispasp", iterations=0)
    with pytest.raises(StructPruneError, match="proxy must be one of paper, contribution"):
        structprune.methods.get("ispasp", proxy="abs")


def test_unknown_model():
    with pytest.raises(StructPruneError, match="model must be one of .*resnet20.*got 'resnet18'"):
        structprune.models.create("resnet18")


def test_a_zoo_models_own_option_check_is_one_line(tmp_path, capsys):
    with pytest.raises(StructPruneError, match="model 'lenet5': input_size must be at least 10"):
        structprune.models.create("lenet5", input_size=8)
    torch.save({"x": torch.randn(16, 1, 8, 8), "y": torch.arange(16) % 2}, tmp_path / "small.pt")
    code = main(["train", "--model", "lenet5", "--data", str(tmp_path / "small.pt"), "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "input_size must be at least 10" in err


def test_forward_failing_on_example_inputs():
    with pytest.raises(StructPruneError, match="example_inputs: the model's forward pass failed"):
        structprune.prune(mlp(), CALIB, example_inputs=torch.randn(1, 5), progress=False)


def test_a_failing_forward_leaves_no_hook_on_the_model():
    from structprune.graph import PruningGraph

    model = mlp()
    with pytest.raises(StructPruneError, match="example_inputs: the model's forward pass failed"):
        PruningGraph(model, torch.randn(1, 5))  # the trace hooks every layer before the forward fails
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_calibration_loader_that_yields_nothing():
    with pytest.raises(StructPruneError, match="calib_loader yielded no samples"):
        structprune.prune(mlp(), [], progress=False)
    with pytest.raises(StructPruneError, match="calib_loader must be iterable"):
        structprune.prune(mlp(), 3, progress=False)


def test_nan_activations_are_reported_with_the_layer():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(StructPruneError, match="NaN or Inf activations reach layer 2"):
        structprune.prune(model, CALIB, example_inputs=torch.zeros(1, 4), progress=False)


def test_missing_and_corrupted_checkpoints(tmp_path):
    with pytest.raises(StructPruneError, match="does not exist"):
        structprune.load(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    structprune.save(structprune.models.create("lenet300"), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(StructPruneError, match="not readable"):
        structprune.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(StructPruneError, match="not written by structprune"):
        structprune.load(foreign)


# -- the CLI: exit code 2, one line on stderr, nothing written -----------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_missing_data_path(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--model", "lenet300", "--data-dir", tmp_path / "missing",
                        "--out", tmp_path / "m.pt")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()


def test_cli_bad_ratio_names_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tmp_path / "x.pt"), "--ratio", "1.5", "--out", str(tmp_path / "y.pt")])
    assert exit_info.value.code == 2
    assert "--ratio" in capsys.readouterr().err


def test_cli_never_overwrites_without_force(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    code, err = run_cli(capsys, "train", "--model", "lenet300", "--data-dir", fmnist_dir, "--epochs", "0",
                        "--out", out, "--no-progress")
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"precious"


def test_cli_rejects_data_the_model_does_not_fit(tmp_path, capsys, fmnist_dir):
    ckpt = tmp_path / "digits-sized.pt"
    structprune.save(structprune.models.create("lenet300", input_size=8), ckpt)
    code, err = run_cli(capsys, "prune", ckpt, "--data-dir", fmnist_dir, "--out", tmp_path / "p.pt")
    assert code == 2 and "does not accept" in err
    assert not (tmp_path / "p.pt").exists()


def test_a_model_whose_output_torch_pruning_cannot_trace_says_so_not_that_its_forward_failed():
    import structprune

    class CacheOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return (self.fc2(torch.relu(self.fc1(x))), (object(),))  # a cache-like object in the output

    x = torch.randn(8, 4)
    CacheOut()(x)  # its forward is fine
    with pytest.raises(StructPruneError, match="Torch-Pruning could not trace the model's outputs"):
        structprune.prune(CacheOut(), [x], "magnitude", 0.5, progress=False)


def test_first_line_keeps_the_line_a_colon_announces():
    from structprune.errors import first_line

    error = RuntimeError("Error(s) in loading state_dict for Net:\n\tsize mismatch for fc.weight: (2, 3) vs (4, 3).")
    assert first_line(error) == "Error(s) in loading state_dict for Net: size mismatch for fc.weight: (2, 3) vs (4, 3)."
    assert first_line(ValueError("one line\nsecond")) == "one line"


def test_a_count_is_an_integer_not_a_bool():
    """check_positive_int, shared by the counts of prune, Target and the methods, refuses True (an int to Python)."""
    from structprune.errors import StructPruneError, check_positive_int

    for bad in (True, 0, -1, 1.0, "3"):
        with pytest.raises(StructPruneError, match="calib_samples must be a positive integer"):
            check_positive_int(bad, "calib_samples")
    check_positive_int(3, "calib_samples")
