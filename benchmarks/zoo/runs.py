"""One model of the zoo benchmark: pruned with each method (and a Target), checked, saved for the reload."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import torch

import structprune
from structprune.errors import StructPruneError

from .baseline import torch_pruning
from .checks import attention_invariants, check_shapes, error_text, run, status_of
from .specs import CALIB_BATCH, CALIB_BATCHES, Spec


def measure(spec: Spec, methods: list[str], target: bool, store: Path) -> list[dict]:
    base = {"model": spec.name, "kind": spec.kind}
    if spec.requires is not None:
        try:
            __import__(spec.requires)
        except ImportError:
            return [{**base, "method": "all", "status": f"not installed ({spec.requires})"}]
    try:
        torch.manual_seed(0)
        dense = spec.build().eval()
        calib = [spec.inputs(CALIB_BATCH, seed) for seed in range(CALIB_BATCHES)]
        batch = spec.inputs(4, 99)
        example = spec.inputs(1, 98)
        dense_out = run(dense, batch)
    except Exception as exc:
        return [{**base, "method": "all", "status": f"ERROR building the model: {error_text(exc)}",
                 "traceback": traceback.format_exc()}]
    reference = torch_pruning(spec, dense, example, dense_out, batch)
    rows = []
    for method in methods:
        row = {**base, "method": method, **reference}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # recorded in result.warnings
                result = structprune.prune(dense, calib, method, 0.5, progress=False)
        except StructPruneError as exc:
            rows.append({**row, "status": f"refused ({exc})"})
            print(f"{spec.name} {method}: {rows[-1]['status']}", flush=True)
            continue
        except Exception as exc:
            rows.append({**row, "status": f"ERROR {error_text(exc)}", "traceback": traceback.format_exc()})
            print(f"{spec.name} {method}: {rows[-1]['status']}", flush=True)
            continue
        pruned = result.model
        row.update(status=status_of(result), seconds=result.seconds,
                   params_ratio=result.after["params"] / max(result.before["params"], 1),
                   macs_ratio=result.after["macs"] / max(result.before["macs"], 1),
                   skipped=result.skipped, warnings=result.warnings,
                   kept={layer["group"]: [layer["kept"], layer["channels"]] for layer in result.layers})
        try:
            pruned_out = run(pruned, batch)
            row["shape"] = check_shapes(dense_out, pruned_out)
        except Exception as exc:
            pruned_out = None
            row["shape"] = f"forward ERROR {error_text(exc)}"
            row["traceback"] = traceback.format_exc()
        row["attention"] = attention_invariants(dense, pruned)
        if target and spec.kind == "cnn":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    aimed = structprune.prune(dense, calib, method, structprune.Target(0.5), progress=False)
                row["target_macs_ratio"] = aimed.after["macs"] / max(aimed.before["macs"], 1)
                row["target_seconds"] = aimed.seconds
            except Exception as exc:
                row["target_status"] = f"ERROR {error_text(exc)}"
        if pruned_out is not None:
            is_hf = hasattr(pruned, "save_pretrained") and hasattr(pruned, "config")
            path = store / (f"{spec.name}-{method}" + ("" if is_hf else ".pt"))
            try:
                structprune.save(result, path)
                torch.save({"batch": batch, "expected": pruned_out}, store / f"{spec.name}-{method}.io.pt")
                row["saved"] = str(path)
            except Exception as exc:
                row["reload"] = f"save failed: {error_text(exc)}"
        rows.append(row)
        print(f"{spec.name} {method}: {row['status']}; params {row['params_ratio']:.1%}, MACs {row['macs_ratio']:.1%}, "
              f"{row['seconds']:.2f}s; shape {row['shape']}; attention {row['attention']}", flush=True)
    return rows
