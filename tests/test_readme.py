"""Every example in README.md runs as written: each Python block in a fresh interpreter, each `structprune …`
command line as a process, in order, block by block (the Hugging Face ones on a tiny local model standing in
for "path/to/model"). The command lines run on the real Fashion-MNIST files, with flags appended that shrink the
data (SMALL); the set-up block's two commands are what CI itself runs (.ci/run)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SHELL = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent  # structprune and torchrun of this environment


def _tiny_bert(directory: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "first", "calibration", "sentence", ".", "and",
             "a", "second", "one", ",", "of", "your", "own", "text"]
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tmp_path):
    code = BLOCKS[index]
    if "path/to/model" in code:
        code = code.replace("path/to/model", str(_tiny_bert(tmp_path / "model")))
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


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
}


def _subcommand(argv: list[str]) -> str:
    return argv[argv.index("structprune") + 1] if "structprune" in argv else argv[0]


def _run_block(argv_list: list[list[str]], cwd: Path, small: dict = SMALL) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    for argv in argv_list:
        assert argv[0] in ("structprune", "torchrun"), argv
        argv = argv + small.get(_subcommand(argv), [])
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"


def test_readme_shell_blocks_are_all_covered():
    kinds = [_subcommand(_command_lines(block)[0]) for block in SHELL]
    # set-up, convert, Hugging Face, command line, models and data from anywhere
    assert kinds == ["make", "convert", "info", "train", "prune"]
    assert _command_lines(SHELL[0]) == [["make", "demo"], ["make", "test"]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make demo" in ci and "make test" in ci


def test_readme_convert_commands_run(tmp_path):
    import torch

    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "from torch import nn\n\n\nclass MyNet(nn.Sequential):\n"
        "    def __init__(self, width=64):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from mypkg.nets import MyNet

        # a structprune 0.1 file: the model pickled whole
        torch.save({"format": "structprune", "version": 1, "arch": None, "history": [], "example_input": None,
                    "module": MyNet()}, tmp_path / "old.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("mypkg.nets", "mypkg"):
            sys.modules.pop(name, None)
    _run_block(_command_lines(SHELL[1]), tmp_path)
    assert (tmp_path / "new.pt").is_file() and (tmp_path / "new-arch.pt").is_file()


def test_readme_hugging_face_commands_run(tmp_path):
    (tmp_path / "path" / "to").mkdir(parents=True)
    _tiny_bert(tmp_path / "path" / "to" / "model")
    words = ["the", "first", "calibration", "sentence", "and", "a", "second", "one", "of", "your", "own", "text"]
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))]  # 12 distinct sentences, 12 words
    (tmp_path / "text.txt").write_text("\n".join(sentences) + "\n")
    # the Hugging Face prune reads text, not images: its own small sizes, and a text file instead of fortunes
    small = {**SMALL, "prune": ["--text", "text.txt", "--limit", "8", "--calib-samples", "8",
                                "--recovery-samples", "16"]}
    _run_block(_command_lines(SHELL[2]), tmp_path, small)
    assert (tmp_path / "pruned-model" / "config.json").is_file() and (tmp_path / "pruned-by-layer").is_dir()
    assert (tmp_path / "pruned-ffn" / "config.json").is_file()
    assert (tmp_path / "pruned-model.onnx").is_file()


def test_readme_command_line_block_runs_in_order(tmp_path):
    _run_block(_command_lines(SHELL[3]), tmp_path)
    for name in ("lenet5.pt", "lenet5-ispasp.pt", "lenet5-ispasp.json", "lenet5-pfp.pt", "lenet5-ispasp-ft.pt",
                 "runs/compare/compare.html", "lenet5-ispasp.onnx", "lenet5-ispasp.ts", "lenet5-ft.pt"):
        assert (tmp_path / name).exists(), name


def test_readme_models_and_data_from_anywhere_run(tmp_path):
    """torchvision and timm through local stand-ins with their registry API (neither installs here)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from conftest import STAND_IN_MODULES, write_stand_ins

    write_stand_ins(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        from structprune import models

        torch.save(models.create("torchvision:resnet18", num_classes=3).state_dict(), tmp_path / "resnet18.pt")
        save_file(models.create("timm:convnext_tiny", num_classes=3).state_dict(), tmp_path / "convnext.safetensors")
        torch.save(models.create("mynets:build", width=64).state_dict(), tmp_path / "mynet.pt")
    finally:
        sys.path.remove(str(tmp_path))
        for name in STAND_IN_MODULES:
            sys.modules.pop(name, None)
    gen = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = gen.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    np.savez(tmp_path / "calib.npz", x=gen.standard_normal((40, 3, 16, 16)).astype(np.float32),
             y=gen.integers(0, 3, 40))
    _run_block(_command_lines(SHELL[4]), tmp_path)
    for name in ("resnet18-half.pt", "convnext-half.pt", "mynet-half.pt"):
        assert (tmp_path / name).exists(), name
