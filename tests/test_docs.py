"""Every example in README.md and docs/ runs as written: each Python block in a fresh interpreter, each command line
as a process, block by block in the order of its file, in a folder that holds what the examples name (mynets.py,
weights.pt, images/, calib.npz, a tiny BERT at path/to/model, text.txt, stand-ins for torchvision and timm). The
command lines on Fashion-MNIST run on the real files with flags appended that shrink the data (SMALL). The README's
set-up block is what CI runs (.ci/run); docs/cli.md is what the parser generates."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STAND_IN_MODULES, USER_FACTORY, USER_IMPORTS, USER_RESNET, write_stand_ins
from structprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # structprune and torchrun of this environment
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def _command_lines(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


# appended to each command so that it reads a few hundred images, not 60,000 (the command is otherwise as written)
SMALL = {
    "train": ["--limit", "256"],
    "finetune": ["--limit", "256"],
    "prune": ["--limit", "200", "--calib-samples", "64", "--recovery-samples", "128", "--train-limit", "256"],
    "compare": ["--limit", "200", "--calib-samples", "64", "--recovery-samples", "128", "--train-limit", "256"],
    "eval": ["--limit", "200"],
    "distill": ["--limit", "256", "--eval-limit", "200"],
}
#: a Hugging Face prune reads text: its own small sizes (it refuses the checkpoint path's --train-limit)
SMALL_TEXT = ["--limit", "8", "--calib-samples", "8", "--recovery-samples", "16"]


def _subcommand(argv: list[str]) -> str:
    return argv[argv.index("structprune") + 1] if "structprune" in argv else argv[0]


def _small(argv: list[str]) -> list[str]:
    if _subcommand(argv) == "prune" and ("--hf-model" in argv or any(a.startswith("hf:") for a in argv)):
        return SMALL_TEXT
    return SMALL.get(_subcommand(argv), [])


def _run_commands(argv_list: list[list[str]], cwd: Path, capsys) -> None:
    """Each command as written (plus SMALL): `structprune ...` in this process, as the console script runs it
    (``main`` with the folder as the current one), `torchrun ...` as a process."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    for argv in argv_list:
        assert argv[0] in ("structprune", "torchrun"), argv
        argv = argv + _small(argv)
        if argv[0] == "torchrun":
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"
            continue
        code = main(argv[1:])
        assert code == 0, f"{shlex.join(argv)}\n{capsys.readouterr().err[-3000:]}"


MYNETS = USER_IMPORTS + USER_RESNET + USER_FACTORY


def _tiny_bert(directory: Path) -> None:
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "first", "calibration", "sentence", ".", "and",
             "a", "second", "one", ",", "of", "your", "own", "text"]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(directory)


def _images(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[..., label] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def workspace(tmp_path, doc):
    """A folder with everything the examples of ``doc`` name (the stand-ins of torchvision and timm only where its
    examples use them: transformers would take the stand-in for the real torchvision)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    examples = "".join(_blocks(doc, "sh") + _blocks(doc, "python"))
    write_stand_ins(tmp_path)
    if "torchvision:" not in examples and "timm:" not in examples:
        for name in ("torchvision", "timm"):
            shutil.rmtree(tmp_path / name)
    (tmp_path / "mynets.py").write_text(MYNETS)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nets.py").write_text(
        "from torch import nn\n\n\nclass MyNet(nn.Sequential):\n"
        "    def __init__(self, width=64):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))\n")
    sys.path.insert(0, str(tmp_path))
    for name in ("mynets", "mypkg.nets", "mypkg"):  # this folder's, not one another test imported
        sys.modules.pop(name, None)
    try:
        import mynets
        from mypkg.nets import MyNet

        from structprune import models

        torch.manual_seed(0)
        torch.save(mynets.TinyResNet().state_dict(), tmp_path / "weights.pt")
        torch.save(mynets.build(width=64).state_dict(), tmp_path / "mynet.pt")
        if (tmp_path / "torchvision").is_dir():
            torch.save(models.create("torchvision:resnet18", num_classes=3).state_dict(), tmp_path / "resnet18.pt")
            save_file(models.create("timm:convnext_tiny", num_classes=3).state_dict(),
                      tmp_path / "convnext.safetensors")
        # a structprune 0.1 file: the model pickled whole
        torch.save({"format": "structprune", "version": 1, "arch": None, "history": [], "example_input": None,
                    "module": MyNet()}, tmp_path / "old.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in (*STAND_IN_MODULES, "mynets", "mypkg.nets", "mypkg"):
            sys.modules.pop(name, None)
    _images(tmp_path / "images")
    gen = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=gen.standard_normal((40, 3, 16, 16)).astype(np.float32),
             y=gen.integers(0, 3, 40))
    np.save(tmp_path / "unlabelled.npy", gen.standard_normal((64, 1, 28, 28)).astype(np.float32))
    _tiny_bert(tmp_path / "path" / "to" / "model")
    words = ["the", "first", "calibration", "sentence", "and", "a", "second", "one", "of", "your", "own", "text"]
    (tmp_path / "text.txt").write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) + "\n")
    return tmp_path


def test_the_readme_is_short_and_starts_with_your_own_model():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first_command = next(i for i, line in enumerate(lines) if line.startswith("structprune prune --model"))
    assert first_command < 60
    assert all(f"docs/{p.name}" in "\n".join(lines) for p in (ROOT / "docs").glob("*.md"))  # every guide linked


def test_the_set_up_block_is_what_ci_runs():
    setup = _blocks("README.md", "sh")[1]
    assert _command_lines(setup) == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make demo" in ci and "make test" in ci


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_block_runs(doc, workspace):
    for index, code in enumerate(_blocks(doc, "python")):
        script = workspace / f"example{index}.py"
        script.write_text(code)
        for attempt in (1, 2) if doc == "README.md" else (1,):  # the README's twice: a second run must work too
            done = subprocess.run([sys.executable, str(script)], cwd=workspace, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{doc} block {index} run {attempt}:\n{done.stderr[-3000:]}"
            assert done.stdout.strip(), f"{doc} block {index} prints nothing"


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_line_runs_in_order(doc, workspace, monkeypatch, capsys):
    blocks = _blocks(doc, "sh")
    if doc == "README.md":
        blocks = [b for b in blocks if not b.startswith("make ") and not b.startswith("pip ")]  # set-up: CI runs it
    monkeypatch.chdir(workspace)
    try:
        for block in blocks:
            _run_commands(_command_lines(block), workspace, capsys)
    finally:
        for name in (*STAND_IN_MODULES, "mynets", "mypkg.nets", "mypkg"):  # imported by the commands from here
            sys.modules.pop(name, None)


def test_the_command_line_reference_is_the_parsers():
    from structprune.cli.reference import markdown

    assert (ROOT / "docs" / "cli.md").read_text() == markdown(), \
        "regenerate it: .venv/bin/python -m structprune.cli.reference > docs/cli.md"
