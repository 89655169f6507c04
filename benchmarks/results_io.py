"""Where every benchmark puts its results: NAME.json (meta + data) and NAME.md (the printed table); pyplot for
the NAME.png plots."""

from __future__ import annotations

import json
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


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
