"""``python -m zoo`` (from benchmarks/): the zoo benchmark's command line; see the package's docstring."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch_pruning
from results_io import write_results

import zoo
from zoo.checks import TEMPORARY
from zoo.reload import RELOAD_TOLERANCE, check_reload, reload_all
from zoo.report import findings, notes, table
from zoo.runs import measure
from zoo.specs import CALIB_BATCH, CALIB_BATCHES, METHODS, SPECS

CANONICAL_COMMAND = "cd benchmarks && ../.venv/bin/python -m zoo --out-dir results"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=zoo.__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write zoo.json and zoo.md here")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of: {', '.join(s.name for s in SPECS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all three)")
    parser.add_argument("--quick", action="store_true", help="magnitude only, no Target(0.5) runs")
    parser.add_argument("--no-target", action="store_true", help="skip the CNNs' Target(0.5) runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--check-reload", default=None, help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args()
    if args.check_reload:
        check_reload(args.check_reload)
        return
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    names = [s.name for s in SPECS]
    chosen = names if args.models is None else [m for m in args.models.split(",") if m]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(names)}")
    methods = ["magnitude"] if args.quick else [m for m in args.methods.split(",") if m]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        TEMPORARY.append(tmp)
        for spec in SPECS:
            if spec.name in chosen:
                rows += measure(spec, methods, target=not (args.quick or args.no_target), store=Path(tmp))
        reload_all(rows, Path(tmp))
    for r in rows:
        r.pop("saved", None)
    total = time.perf_counter() - start
    import transformers

    command = ("cd benchmarks && ../.venv/bin/python -m zoo " + " ".join(sys.argv[1:])).strip()
    meta = {"date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, {torch.get_num_threads()} "
                       f"torch thread(s) of {torch.get_num_interop_threads()} interop",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_pruning": getattr(torch_pruning, "__version__", "?"), "command": command,
            "canonical_command": CANONICAL_COMMAND, "calib_samples": CALIB_BATCHES * CALIB_BATCH,
            "methods": methods, "budget": "keep ratio 0.5 per group (default pipeline)", "seconds": total}
    text = table(rows)
    found = findings(rows)
    header = (f"# Model zoo: structprune's default pipeline at a keep ratio of 0.5\n\n"
              f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, "
              f"torch-pruning {meta['torch_pruning']}; "
              f"`{CANONICAL_COMMAND}` (this run: `{command}`, {total:.0f} s). Random weights, "
              f"{meta['calib_samples']} synthetic calibration samples, `structprune.prune(model, calib, method, 0.5, "
              f"progress=False)`; reload in a fresh process, max abs diff on a batch of 4 (≤ {RELOAD_TOLERANCE:g}). "
              f"Torch-Pruning: MetaPruner, L2 magnitude, pruning_ratio=0.5, output layer ignored (prune time "
              f"includes building its graph).\n\n")
    noted = notes(rows)
    footer = ("\n\n## Findings\n\nErrors, output shapes unlike the dense model's, reloads not equal, violated "
              "invariants, models Torch-Pruning prunes where structprune refuses:\n\n"
              + ("\n".join(f"- {f}" for f in found) if found else "none")
              + "\n\nGroups structprune leaves whole (with a warning) where Torch-Pruning prunes:\n\n"
              + ("\n".join(f"- {n}" for n in noted) if noted else "none") + "\n")
    print(text + footer)
    print(f"total {total:.0f}s")
    payload = {"meta": meta, "rows": rows, "findings": found, "notes": noted}
    write_results(args.out_dir, "zoo", payload, header + text + footer)


if __name__ == "__main__":
    main()

