"""English text for calibrating and evaluating language models, offline.

The default source is Debian's ``fortunes`` package (``apt-get install fortunes``): about 15,000
quotations, jokes and aphorisms in plain English under ``/usr/share/games/fortunes``, one entry
per ``%``-separated block. Any text file works too: one sentence per line, or ``%``-separated
blocks (the fortune format), or JSON lines (``.jsonl``: one string, or an object with a ``"text"`` field,
per line).

Entries are cleaned (whitespace collapsed, 6 to 60 words, mostly letters, no tables or ASCII art),
de-duplicated and split into a calibration and a held-out part by a seeded shuffle.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import StructPruneError

FORTUNES = Path("/usr/share/games/fortunes")
_SKIP = {"art", "ascii-art"}  # pictures, not sentences


def read(path: str | Path | None = None) -> list[str]:
    """Clean English entries from ``path`` (a text file or a directory of fortune files);
    default: Debian's fortunes."""
    path = Path(path) if path is not None else FORTUNES
    if not path.exists():
        hint = " (install Debian's fortunes: apt-get install fortunes)" if path == FORTUNES else ""
        raise StructPruneError(f"text: {path} does not exist{hint}")
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and not p.suffix and p.name not in _SKIP)
    entries: list[str] = []
    for file in files:
        raw = file.read_text(encoding="utf-8", errors="replace")
        if file.suffix == ".jsonl":
            entries.extend(b for b in (_clean(text) for text in _json_lines(file, raw)) if b)
            continue
        blocks = re.split(r"^%\s*$", raw, flags=re.M) if re.search(r"^%\s*$", raw, flags=re.M) else raw.splitlines()
        entries.extend(b for b in (_clean(block) for block in blocks) if b)
    entries = list(dict.fromkeys(entries))
    if not entries:
        raise StructPruneError(f"text: no usable sentences in {path} (6 to 60 words of mostly letters each)")
    return entries


def _json_lines(file: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise StructPruneError(f"text: {file} line {number} is not JSON ({exc})") from None
        value = value.get("text") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise StructPruneError(f"text: {file} line {number} is neither a string nor an object with a text field")
        texts.append(value)
    return texts


def _clean(block: str) -> str | None:
    if re.search(r"\S(\t| {3,})\S", block.strip()):  # tables and aligned columns
        return None
    text = " ".join(block.split())
    words = text.split(" ")
    if not 6 <= len(words) <= 60:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return text if letters >= 0.85 * len(text) else None


def split(entries: Sequence[str], held_out: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(calibration, held-out): a seeded shuffle, the last ``held_out`` fraction held out."""
    if not 0 < held_out < 1:
        raise StructPruneError(f"held_out must be in (0, 1), got {held_out!r}")
    order = list(entries)
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(order) * (1 - held_out)))
    if cut >= len(order):
        raise StructPruneError(f"text: {len(order)} entries are too few to hold any out")
    return order[:cut], order[cut:]


class TokenBatches:
    """Re-iterable batches of tokenized text: dicts of ``input_ids``, ``attention_mask`` (and whatever
    else the tokenizer returns), padded per batch, truncated to ``max_length`` tokens."""

    def __init__(self, texts: Sequence[str], tokenizer, batch_size: int = 32, max_length: int = 128,
                 device=None):
        if not texts:
            raise StructPruneError("text: no sentences to tokenize")
        self.texts, self.tokenizer = list(texts), tokenizer
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.texts), self.batch_size):
            batch = self.tokenizer(self.texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            yield {k: v.to(self.device) if self.device is not None else v for k, v in batch.items()}
