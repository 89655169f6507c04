"""The CLI end to end on a small IDX dataset: train, prune, eval, info, with reports next to outputs."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

import structprune
from structprune.cli import main


def test_train_prune_eval_info(tmp_path, capsys, fmnist_dir):
    dense = tmp_path / "lenet5.pt"
    assert main(["train", "--model", "lenet5", "--data-dir", str(fmnist_dir), "--epochs", "1", "--batch-size", "16",
                 "--out", str(dense), "--no-progress"]) == 0
    train_report = json.loads(dense.with_suffix(".json").read_text())
    assert train_report["model"] == "lenet5" and train_report["train_samples"] == 64

    for method in ("ispasp", "pfp"):
        pruned = tmp_path / f"{method}.pt"
        assert main(["prune", str(dense), "--method", method, "--ratio", "0.5", "--data-dir", str(fmnist_dir),
                     "--calib-samples", "32", "-o", "delta=1e-6" if method == "pfp" else "iterations=5",
                     "--out", str(pruned), "--no-progress"]) == 0
        report = json.loads(pruned.with_suffix(".json").read_text())
        assert report["method"] == method and report["calib_samples"] == 32
        assert report["after"]["params"] < report["before"]["params"]
        assert {"accuracy_before", "accuracy_after"} <= set(report)
        assert [layer["group"] for layer in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
        for layer in report["layers"]:  # each group's residual on its calibration rows, and the refit's below it
            assert 0 < layer["relative_residual_refit"] <= layer["relative_residual"] + 1e-9
            assert layer["kept"] < layer["channels"] and layer["refit"]
        assert structprune.load(pruned).conv2.out_channels == 8
    out = capsys.readouterr().out
    assert "ispasp (oneshot): params" in out

    table = tmp_path / "table.json"
    assert main(["eval", str(dense), str(tmp_path / "ispasp.pt"), "--data-dir", str(fmnist_dir),
                 "--json", str(table)]) == 0
    rows = json.loads(table.read_text())["rows"]
    assert rows[1]["macs"] < rows[0]["macs"] and rows[1]["params"] < rows[0]["params"]
    assert "| checkpoint | runtime | accuracy (%)" in capsys.readouterr().out
    assert (rows[1]["dense_params"], rows[1]["dense_macs"]) == (rows[0]["params"], rows[0]["macs"])
    assert "dense_params" not in rows[0]  # the dense checkpoint records no pruning

    assert main(["eval", str(tmp_path / "pfp.pt"), "--data-dir", str(fmnist_dir)]) == 0  # alone: kept of its dense
    pfp_report = json.loads((tmp_path / "pfp.json").read_text())
    kept = pfp_report["after"]["params"] / pfp_report["before"]["params"]
    assert f"| {kept:.1%} |" in capsys.readouterr().out and kept < 1

    assert main(["info", str(tmp_path / "pfp.pt")]) == 0
    out = capsys.readouterr().out
    assert "4 prunable groups" in out and "| 1 | conv2 | 8 | conv2 | fc1 |" in out
    assert "output layers (never pruned): fc3" in out


def test_info_on_a_fresh_zoo_model(capsys):
    assert main(["info", "--model", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "resnet20 (fresh, fashion-mnist inputs)" in out and "12 prunable groups" in out


def test_every_command_has_help(capsys):
    from structprune.cli import COMMANDS, command

    assert sorted(COMMANDS) == ["compare", "convert", "distill", "eval", "export", "finetune", "info", "prune", "train"]
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = "".join(capsys.readouterr().out.split())  # argparse wraps lines (at hyphens too)
        assert exit_.value.code == 0 and out.startswith("usage:structprune" + name)
        assert "".join(command(name).DESCRIPTION.split()) in out


def _trained(tmp_path, fmnist_dir):
    dense = tmp_path / "lenet5.pt"
    assert main(["train", "--model", "lenet5", "--data-dir", str(fmnist_dir), "--epochs", "1", "--batch-size", "16",
                 "--out", str(dense), "--no-progress"]) == 0
    return dense


def test_prune_to_a_flops_target_with_a_cascade(tmp_path, fmnist_dir):
    dense = _trained(tmp_path, fmnist_dir)
    out = tmp_path / "cascade.pt"
    assert main(["prune", str(dense), "--method", "magnitude", "--target-flops", "0.5", "--schedule", "cascade",
                 "--steps", "3", "--finetune-epochs", "1", "--batch-size", "16", "--data-dir", str(fmnist_dir),
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [step["step"] for step in report["steps"]] == [1, 2, 3]
    assert all("accuracy_finetuned" in step for step in report["steps"])
    assert report["macs_ratio"] == report["steps"][-1]["macs_ratio"]
    assert abs(report["macs_ratio"] - 0.5) < 0.05
    assert structprune.load(out)(structprune.checkpoint.example_input(structprune.load(out))).shape == (1, 10)


def test_prune_budget_flags_are_validated(tmp_path, fmnist_dir, capsys):
    dense = _trained(tmp_path, fmnist_dir)
    common = ["--data-dir", str(fmnist_dir), "--out", str(tmp_path / "x.pt"), "--no-progress"]
    for flags, message in [
        (["--ratio", "0.5", "--target-flops", "0.5"], "exclude each other"),
        (["--target-flops", "0.5", "--target-params", "0.5"], "only one of"),
        (["--allocation", "pfp"], "needs --target-flops"),
        (["--schedule", "sequential"], "--layer-finetune-epochs"),
        (["--layer-ratio", "nothing*=0.5"], "matches no prunable group"),
    ]:
        assert main(["prune", str(dense), *flags, *common]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_out_of_range_fractions_are_refused_naming_what_they_are_fractions_of(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.pt")]
    for flag, what in [("--ratio", "channels"), ("--target-flops", "the dense MACs"),
                       ("--target-params", "the dense parameters"), ("--target-latency", "the dense forward time")]:
        with pytest.raises(SystemExit) as exc:
            main(["prune", "--model", "lenet5", flag, "1.5", *out])
        assert exc.value.code == 2
        assert f"argument {flag}: must be in (0, 1] (the fraction of {what} kept), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "x.pt", "--targets", "0.5,0"])
    assert "--targets: must be comma-separated numbers in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_compare_writes_table_json_and_plot(tmp_path, fmnist_dir, capsys):
    dense = _trained(tmp_path, fmnist_dir)
    out_dir = tmp_path / "cmp"
    args = ["compare", str(dense), "--methods", "ispasp,magnitude,thinet", "--targets", "0.7,0.4",
            "--calib-samples", "32", "--finetune-epochs", "1", "--batch-size", "16", "--data-dir", str(fmnist_dir),
            "--out-dir", str(out_dir), "--no-progress"]
    assert main(args) == 0
    payload = json.loads((out_dir / "compare.json").read_text())
    assert [(r["method"], r["target"]) for r in payload["rows"]] == [
        (m, t) for m in ("ispasp", "magnitude", "thinet") for t in (0.7, 0.4)]
    assert all({"accuracy_pruned", "accuracy_finetuned", "prune_seconds", "macs_ratio"} <= set(r)
               for r in payload["rows"])
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| thinet | 0.40 |" in (out_dir / "compare.md").read_text()
    page = (out_dir / "compare.html").read_text()
    png = base64.b64encode((out_dir / "compare.png").read_bytes()).decode()
    assert page.startswith("<!DOCTYPE html>") and f'src="data:image/png;base64,{png}"' in page  # self-contained
    assert "<td>thinet</td><td>0.40</td>" in page and "&quot;calib_samples&quot;: 32" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # no file or URL it would need next to it
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # nothing overwritten


def test_finetune_resumes_an_interrupted_run(tmp_path, fmnist_dir, capsys, monkeypatch):
    dense = _trained(tmp_path, fmnist_dir)
    args = ["finetune", str(dense), "--epochs", "2", "--batch-size", "16", "--data-dir", str(fmnist_dir),
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "ref.pt")]) == 0

    from structprune.run_state import RunState

    real_save = RunState.save

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(RunState, "save", save_then_die)
    out = tmp_path / "tuned.pt"
    assert main(args + ["--out", str(out)]) == 130
    monkeypatch.setattr(RunState, "save", real_save)
    assert not out.exists() and (tmp_path / "tuned.pt.state").exists()
    assert main(args + ["--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    ref, tuned = structprune.load(tmp_path / "ref.pt"), structprune.load(out)
    for a, b in zip(ref.state_dict().values(), tuned.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cascade_resumes_after_an_interruption_with_the_same_result(tmp_path, fmnist_dir, capsys, monkeypatch):
    dense = _trained(tmp_path, fmnist_dir)
    args = ["prune", str(dense), "--method", "ispasp", "--target-flops", "0.4", "--schedule", "cascade",
            "--steps", "3", "--finetune-epochs", "1", "--train-limit", "512", "--calib-samples", "64",
            "--batch-size", "32", "--limit", "256", "--data-dir", str(fmnist_dir), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "ref.pt")]) == 0

    from structprune.cli import common

    real_fit, calls = common.fit, []

    def killed_in_step_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second step's fine-tune
        return real_fit(*a, **k)

    monkeypatch.setattr(common, "fit", killed_in_step_two)
    out = tmp_path / "cut.pt"
    assert main(args + ["--out", str(out)]) == 130
    assert "rerun the same command with --resume" in capsys.readouterr().err
    monkeypatch.setattr(common, "fit", real_fit)
    assert not out.exists() and (tmp_path / "cut.pt.state").exists()
    assert main(args + ["--out", str(out)]) == 2 and "pass --resume" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume", "--steps", "4"]) == 2
    assert "other options" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert not (tmp_path / "cut.pt.state").exists()
    ref, cut = structprune.load(tmp_path / "ref.pt"), structprune.load(out)
    for a, b in zip(ref.state_dict().values(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    steps = [json.loads(p.with_suffix(".json").read_text())["steps"] for p in (tmp_path / "ref.pt", out)]
    assert [s["macs"] for s in steps[0]] == [s["macs"] for s in steps[1]]
    assert [s["accuracy_finetuned"] for s in steps[0]] == [s["accuracy_finetuned"] for s in steps[1]]


def test_prune_round_to_auto(tmp_path, fmnist_dir, capsys, monkeypatch):
    monkeypatch.setitem(structprune.allocate.HARDWARE_MULTIPLE, "cpu", 8)  # an AVX2 CPU's, whatever this one runs
    dense = _trained(tmp_path, fmnist_dir)
    common = ["--data-dir", str(fmnist_dir), "--calib-samples", "32", "--no-eval", "-q"]
    assert main(["prune", str(dense), "--ratio", "0.3", "--round-to", "8", "--out", str(tmp_path / "a.pt"),
                 *common]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["budget"]["round_to"] == 8
    # ⌈0.3·C⌉ rounded up to 8: conv1 6 → 2 → 8 > 6, so all 6; conv2 16 → 5 → 8; fc1 120 → 36 → 40; fc2 84 → 26 → 32
    assert [layer["kept"] for layer in report["layers"]] == [6, 8, 40, 32]
    # the default, auto, takes a ratio as given
    assert main(["prune", str(dense), "--ratio", "0.3", "--out", str(tmp_path / "c.pt"), *common]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["budget"]["round_to"] is None and [layer["kept"] for layer in report["layers"]] == [2, 5, 36, 26]
    # and takes the device's multiple on a target, in the groups of 32 channels or more: LeNet-5's fc1 and fc2;
    # conv1 and conv2 (6 and 16) keep their widths as they fall (the report says so); none tries nothing
    assert main(["prune", str(dense), "--target-flops", "0.5", "--out", str(tmp_path / "d.pt"), *common]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    budget = report["budget"]
    assert budget["round_to"] == 8 and budget["unrounded_groups"] == ["conv1", "conv2"]
    assert "round_to_auto" not in budget and abs(budget["achieved"] - 0.5) <= 0.005
    assert all(layer["kept"] % 8 == 0 for layer in report["layers"] if layer["group"] in ("fc1", "fc2"))
    assert main(["prune", str(dense), "--target-flops", "0.5", "--round-to", "none", "--out", str(tmp_path / "e.pt"),
                 *common]) == 0
    budget = json.loads((tmp_path / "e.json").read_text())["budget"]
    assert budget["round_to"] is None and "round_to_auto" not in budget
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(dense), "--round-to", "fast", "--out", str(tmp_path / "b.pt"), *common])
    assert exit_.value.code == 2 and "--round-to: must be a positive integer, auto or none" in capsys.readouterr().err
