"""A newcomer's first hour, replayed: their own small residual CNN (a module of theirs), a folder of 32×32 images
in three classes, a state_dict from plain PyTorch training; then prune → eval → info → export → compare from the
command line with no Python of structprune's in between. And each mistake such a newcomer makes gets one line that
names the fix."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import structprune
from conftest import USER_IMPORTS, USER_RESNET
from structprune.cli import main

MYNETS = USER_IMPORTS + USER_RESNET + '''

class Pairs(torch.utils.data.Dataset):
    """(x, y) samples, no `classes` attribute: the labels say how many there are."""

    def __init__(self, split="train"):
        gen = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.x = torch.randn(60, 3, 32, 32, generator=gen)
        self.y = torch.arange(60) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def dataset(split="train"):
    return Pairs(split)
'''


def _images(root: Path, size: int = 32, per_class: int = 12) -> Path:
    """An image folder of 3 classes (a class is a colour), some greyscale and RGBA images, a stray file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            pixels[..., label] += 150
            image = Image.fromarray(pixels)
            image = image.convert("L") if i == 0 else image.convert("RGBA") if i == 1 else image
            image.save(root / name / f"{i}.png")
    (root / "red" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(autouse=True)
def _forget_mynets():
    """The tests that run the command line in this process import the session's mynets: no other test sees it."""
    yield
    sys.modules.pop("mynets", None)


@pytest.fixture
def session(tmp_path):
    """The newcomer's folder: mynets.py, images/, weights.pt (trained in plain PyTorch: a state_dict)."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent(MYNETS))
    _images(tmp_path / "images")
    sys.path.insert(0, str(tmp_path))
    try:
        import mynets
        torch.manual_seed(0)
        torch.save(mynets.TinyResNet().state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
    return tmp_path


def _cli(cwd: Path, *argv, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``structprune ARGV`` as a user runs it: a fresh process in ``cwd``, no PYTHONPATH of ours."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    command = [str(Path(sys.executable).parent / "structprune"), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_own_model_session_runs_from_the_command_line_alone(session):
    prune = _cli(session, "prune", "--model", "mynets:TinyResNet", "--weights", "weights.pt",
                 "--data", "imagefolder:images", "--ratio", "0.5", "--out", "tiny-half.pt", "--no-progress")
    assert prune.returncode == 0, prune.stderr
    assert "images read at 32×32" in prune.stderr  # the images' own size, not 224
    assert "3 greyscale" in prune.stderr and "3 RGBA" in prune.stderr and "not images left out" in prune.stderr
    assert "keeping about 25% of its weights" in prune.stderr  # why --ratio 0.5 leaves a quarter of the params
    report = json.loads((session / "tiny-half.json").read_text())
    assert report["before"]["macs"] < 20_000_000  # 32×32 inputs: no 224×224 upscaling
    for command in (["eval", "tiny-half.pt"], ["info", "tiny-half.pt"]):  # the data the checkpoint records
        done = _cli(session, *command)
        assert done.returncode == 0, done.stderr
        assert "fashion" not in (done.stdout + done.stderr).lower()
    evaluated = _cli(session, "eval", "tiny-half.pt", "--json", "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr
    row = json.loads((session / "eval.json").read_text())["rows"][0]
    assert row["macs"] == report["after"]["macs"] and row["dense_macs"] == report["before"]["macs"]
    assert {"latency_median_ms_batch1", "latency_iqr_ms_batch64"} <= set(row) and "latency b=64" in evaluated.stdout
    exported = _cli(session, "export", "tiny-half.pt", "--out", "tiny-half.onnx")
    assert exported.returncode == 0, exported.stderr
    assert "PyTorch" in exported.stdout and "at 64" in exported.stdout
    compared = _cli(session, "compare", "--model", "mynets:TinyResNet", "--weights", "weights.pt", "--data",
                    "imagefolder:images", "--methods", "magnitude", "--targets", "0.5", "--out-dir", "cmp",
                    "--calib-samples", "16", "--no-progress")
    assert compared.returncode == 0, compared.stderr
    assert json.loads((session / "cmp" / "compare.json").read_text())["complete"]


def test_a_module_outside_the_path_names_pythonpath_and_the_current_folder(session, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    done = _cli(elsewhere, "info", "--model", "mynets:TinyResNet", "--data", f"imagefolder:{session / 'images'}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "PYTHONPATH" in done.stderr and str(elsewhere) in done.stderr
    ok = _cli(elsewhere, "info", "--model", "mynets:TinyResNet", "--data", f"imagefolder:{session / 'images'}",
              env_extra={"PYTHONPATH": str(session)})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("name, hint", [("mynets.TinyResNet", "did you mean mynets:TinyResNet?"),
                                        ("resnet18", "did you mean torchvision:resnet18?"),
                                        ("resnet2", "did you mean resnet20 (the zoo)?")])
def test_an_unknown_model_name_lists_the_forms_and_the_closest(name, hint, capsys):
    assert main(["info", "--model", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hint in err
    assert all(form in err for form in ("module:Name", "torchvision:NAME", "timm:NAME", "hf:DIR"))


def test_a_dataset_of_pairs_has_labels_without_a_classes_attribute(session, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(session))
    monkeypatch.chdir(session)
    assert main(["prune", "--model", "mynets:TinyResNet", "--weights", "weights.pt", "--data", "mynets:dataset",
                 "--ratio", "0.5", "--out", "p.pt", "--no-progress"]) == 0, capsys.readouterr().err
    assert "accuracy_after" in json.loads(Path("p.json").read_text())


def test_images_read_more_than_twice_their_size_are_warned_about(session, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(session))
    monkeypatch.chdir(session)
    assert main(["info", "--model", "mynets:TinyResNet", "--data", "imagefolder:images", "--image-size", "224"]) == 0
    err = capsys.readouterr().err
    assert "images of 32×32 are read at 224×224" in err and "pass --image-size 32" in err


def test_info_of_a_model_that_does_not_read_the_default_data_says_pass_data(session, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(session))
    assert main(["info", "--model", "mynets:TinyResNet"]) == 2  # a 3-channel model, Fashion-MNIST is 1-channel
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --data" in err and "example_inputs" not in err


def test_weights_of_another_architecture_say_how_many_keys_differ_and_which(session, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(session))
    monkeypatch.chdir(session)
    torch.save(structprune.models.create("resnet20", num_classes=3, in_channels=3).state_dict(), "other.pt")
    assert main(["prune", "--model", "mynets:TinyResNet", "--weights", "other.pt", "--data", "imagefolder:images",
                 "--out", "p.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing (stem.0.weight" in err and "unexpected (conv1.weight" in err
    assert "--model" in err and not Path("p.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["prune", "x.pt", "--ratio", "50", "--out", "y.pt"], "--ratio: must be in (0, 1]"),
    (["prun"], "did you mean prune?"),
    (["prune", "x.pt", "--method", "ispas", "--out", "y.pt"], "did you mean ispasp?"),
    (["compare", "x.pt"], "the following arguments are required: --out-dir"),
])
def test_a_command_line_mistake_is_one_line_with_the_way_to_help(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and "--help)" in err


def test_outputs_are_readable_as_the_umask_allows(session, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(session))
    monkeypatch.chdir(session)
    old = os.umask(0o022)
    try:
        assert main(["prune", "--model", "mynets:TinyResNet", "--weights", "weights.pt", "--data",
                     "imagefolder:images", "--out", "p.pt", "--no-progress"]) == 0, capsys.readouterr().err
        from structprune.models import hf

        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16)
        hf.save_pretrained(transformers.BertModel(config), "bert-dir")
    finally:
        os.umask(old)
    for path in ("p.pt", "p.json", "bert-dir/config.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert stat.S_IMODE(os.stat("bert-dir").st_mode) == 0o755
