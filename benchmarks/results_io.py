"""Where every benchmark puts its results: NAME.json (meta + data) and NAME.md (the printed table); pyplot for
the NAME.png plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_results(out_dir: str | Path | None, name: str, payload: dict, text: str) -> Path | None:
    """Write ``payload`` as ``out_dir/name.json`` and ``text`` as ``out_dir/name.md``; returns the folder
    (None, writing nothing, when ``out_dir`` is None)."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    return out


def write_table(out_dir: str | Path | None, name: str, title: str, command: str, rows: list[dict],
                table: list[str]) -> str:
    """Print a benchmark's Markdown ``table`` under a header saying when, where and how it was measured, and write
    it (``name.md``) with ``rows`` and that meta (``name.json``); returns the text."""
    import platform
    from datetime import date

    import torch

    header = (f"# {title}\n\n{date.today()}, {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
              f"{torch.__version__}; `{command}`\n\n")
    text = header + "\n".join(table) + "\n"
    print(text)
    meta = {"date": str(date.today()), "command": command, "machine": platform.machine(),
            "threads": torch.get_num_threads()}
    write_results(out_dir, name, {"meta": meta, "rows": rows}, text)
    return text


def read_results(out_dir: str | Path, name: str, required: bool = False) -> dict | None:
    """The payload of ``out_dir/name.json`` from an earlier run (None when there is none); with ``required``
    (``--replot``), its absence ends the script with a one-line message."""
    path = Path(out_dir) / f"{name}.json"
    if not path.exists():
        if required:
            sys.exit(f"--replot: {path} does not exist")
        return None
    return json.loads(path.read_text())


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
