"""The CLI end to end on a small IDX dataset: train, prune, eval, info, with reports next to outputs."""

from __future__ import annotations

import json

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
                     "--calib-samples", "32", "-o", "max_rows=512" if method == "pfp" else "iterations=5",
                     "--out", str(pruned), "--no-progress"]) == 0
        report = json.loads(pruned.with_suffix(".json").read_text())
        assert report["method"] == method and report["calib_samples"] == 32
        assert report["after"]["params"] < report["before"]["params"]
        assert {"accuracy_before", "accuracy_after"} <= set(report)
        assert [layer["group"] for layer in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
        assert all(0 <= layer["relative_residual"] for layer in report["layers"])
        assert structprune.load(pruned).conv2.out_channels == 8
    out = capsys.readouterr().out
    assert "ispasp (oneshot): params" in out

    table = tmp_path / "table.json"
    assert main(["eval", str(dense), str(tmp_path / "ispasp.pt"), "--data-dir", str(fmnist_dir),
                 "--json", str(table)]) == 0
    rows = json.loads(table.read_text())["rows"]
    assert rows[1]["macs"] < rows[0]["macs"] and rows[1]["params"] < rows[0]["params"]
    assert "| checkpoint | accuracy (%)" in capsys.readouterr().out

    assert main(["info", str(tmp_path / "pfp.pt")]) == 0
    out = capsys.readouterr().out
    assert "4 prunable groups" in out and "| 1 | conv2 | 8 | conv2 | fc1 |" in out
    assert "output layers (never pruned): fc3" in out


def test_info_on_a_fresh_zoo_model(capsys):
    assert main(["info", "--model", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "resnet20 (fresh, fashion-mnist inputs)" in out and "12 prunable groups" in out


def test_every_command_has_help(capsys):
    for command in ("train", "prune", "eval", "info"):
        try:
            main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert "usage: structprune " + command in capsys.readouterr().out
