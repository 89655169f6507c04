"""Every pruned model of a zoo run loaded in one fresh process, and compared on its saved batch."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch

import structprune

from .checks import TEMPORARY, error_text, max_diff, run, short

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: where `python -m zoo` runs
RELOAD_TOLERANCE = 1e-5


def reload_all(rows: list[dict], store: Path) -> None:
    """Load every saved model in one fresh process (``python -m zoo --check-reload``) and fill rows' "reload"."""
    saved = {f"{r['model']}-{r['method']}": r["saved"] for r in rows if "saved" in r}
    if not saved:
        return
    manifest = store / "manifest.json"
    manifest.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, "-m", "zoo", "--check-reload", str(manifest)],
                          capture_output=True, text=True, timeout=600, cwd=HERE)
    try:
        answers = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answers = {}
    for r in rows:
        key = f"{r['model']}-{r['method']}"
        if key in saved:
            answer = answers.get(key)
            if answer is None:
                r["reload"] = f"no answer from the fresh process (rc {proc.returncode}: {short(proc.stderr, 200)})"
            elif "error" in answer:
                r["reload"] = f"load ERROR {answer['error']}"
                r["reload_traceback"] = answer.get("traceback")
            else:
                diff = answer["diff"]
                r["reload_diff"] = diff
                r["reload"] = f"{'yes' if diff <= RELOAD_TOLERANCE else 'no'} ({diff:.1e})"


def check_reload(manifest: str) -> None:
    """The fresh process: load each saved model, run it on its batch, print {key: {"diff"} or {"error"}}."""
    TEMPORARY.append(str(Path(manifest).parent))
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    answers = {}
    for key, path in json.loads(Path(manifest).read_text()).items():
        try:
            io = torch.load(Path(manifest).parent / f"{key}.io.pt", weights_only=True)
            model = structprune.load(path)
            answers[key] = {"diff": max_diff(run(model, io["batch"]), io["expected"])}
        except Exception as exc:
            answers[key] = {"error": error_text(exc), "traceback": traceback.format_exc()}
    print(json.dumps(answers))
