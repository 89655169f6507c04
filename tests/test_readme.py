"""Every Python example in README.md runs as written (in a fresh interpreter; the Hugging Face one on a tiny
local model standing in for "path/to/model")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


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
