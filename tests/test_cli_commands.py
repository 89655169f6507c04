"""The command line as a table of commands: --help loads none of them, and each of prune's two paths refuses the
other's options by name instead of ignoring them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from structprune.cli import COMMANDS, build_parser, main
from structprune.cli.prune import path_parser

#: a valid value for each option only the checkpoint path takes (None: a flag without a value)
CHECKPOINT_ONLY = {
    "--model-kwargs": "{}", "--weights": "w.pt", "--schedule": "cascade", "--steps": "2", "--resume": None,
    "--finetune-epochs": "1", "--train-limit": "8", "--lr": "0.1", "--momentum": "0.5", "--weight-decay": "0",
    "--lr-schedule": "step", "--warmup-epochs": "1", "--label-smoothing": "0.1", "--layer-finetune-epochs": "1",
    "--no-eval": None, "--data": "digits", "--data-dir": "somewhere", "--image-size": "8", "--mean": "0.5",
    "--std": "0.5",
}
HF_ONLY = {"--hf-model": "DIR", "--prune": "heads", "--text": "t.txt", "--max-length": "16", "--layers-keep": "2",
           "--dtype": "bfloat16", "--hidden-keep": "0.75", "--layers-criterion": "loss"}


def _option_strings(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def _prune_parser():
    parser = build_parser(["prune"])
    return next(a for a in parser._actions if a.dest == "command").choices["prune"]


def test_each_path_of_prune_has_its_own_option_set():
    everything = _option_strings(_prune_parser())
    hugging_face, checkpoint = _option_strings(path_parser(True)), _option_strings(path_parser(False))
    assert everything - hugging_face - {"--help"} == set(CHECKPOINT_ONLY)  # a new option: placed and tested below
    assert everything - checkpoint - {"--help"} == set(HF_ONLY)


@pytest.mark.parametrize("flag", sorted(CHECKPOINT_ONLY))
def test_an_option_that_does_not_apply_to_hf_model_is_refused_by_name(flag, tmp_path, capsys):
    value = [] if CHECKPOINT_ONLY[flag] is None else [CHECKPOINT_ONLY[flag]]
    out = tmp_path / "pruned"
    code = main(["prune", "--hf-model", str(tmp_path / "model"), "--out", str(out), flag, *value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{flag}: not available with --hf-model" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", sorted(set(HF_ONLY) - {"--hf-model"}))
def test_an_option_of_hf_model_given_with_a_checkpoint_is_refused_by_name(flag, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    code = main(["prune", str(tmp_path / "model.pt"), "--out", str(out), flag, HF_ONLY[flag]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{flag} goes with --hf-model" in err
    assert not out.exists()


def test_options_of_both_paths_pass_the_check(tmp_path, capsys):
    """The negative control: shared options alone get past the check (to the missing directory)."""
    (tmp_path / "t.txt").write_text("".join(f"the quick brown fox number {i} jumps over the lazy dog\n"
                                            for i in range(10)))
    code = main(["prune", "--hf-model", str(tmp_path / "model"), "--out", str(tmp_path / "o"), "--ratio", "0.5",
                 "--method", "magnitude", "--batch-size", "4", "--seed", "1", "--no-progress", "--text",
                 str(tmp_path / "t.txt"), "--max-length", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "not available with --hf-model" not in err and "no config.json" in err


def test_help_lists_every_command_and_loads_none_of_them():
    code = ("import sys, structprune.cli as cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('structprune.', 'torch_pruning'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *help_lines, loaded = run.stdout.strip().splitlines()
    for name in COMMANDS:
        assert any(line.strip().startswith(name) for line in help_lines), name
    loaded = eval(loaded)  # a list of module names printed above
    assert not [m for m in loaded if m.startswith(("structprune.cli.", "torch_pruning"))
                and m not in ("structprune.cli.shell",)], loaded
    assert not {"structprune.pipeline", "structprune.models", "structprune.graph"} & set(loaded)


def test_a_command_builds_only_its_own_parser(monkeypatch):
    built = []
    real = __import__("structprune.cli", fromlist=["command"]).command

    def spy(name):
        built.append(name)
        return real(name)

    monkeypatch.setattr("structprune.cli.command", spy)
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert built == ["info"]


@pytest.mark.parametrize("command", [["eval", "a.pt"], ["info", "a.pt"], ["export", "a.pt", "--out", "a.onnx"],
                                     ["compare", "a.pt", "--out-dir", "cmp"], ["prune", "a.pt", "--out", "b.pt"]])
def test_model_options_without_model_are_refused_not_ignored(command, tmp_path, capsys, monkeypatch):
    import structprune

    monkeypatch.chdir(tmp_path)
    structprune.save(structprune.models.create("lenet300"), "a.pt")
    code = main([*command, "--weights", "w.pt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--weights" in err and "--model SPEC" in err
    assert not any(Path(p).exists() for p in ("a.onnx", "cmp", "b.pt"))


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_measured_widths_without_the_error_allocation_is_refused(command, tmp_path, capsys):
    out = ["--out", str(tmp_path / "p.pt")] if command == "prune" else ["--out-dir", str(tmp_path / "c")]
    code = main([command, str(tmp_path / "model.pt"), "--target-flops" if command == "prune" else "--targets", "0.5",
                 "--measured-widths", "2", *out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--measured-widths goes with --allocation error" in err
    assert not any(tmp_path.iterdir())
