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
