"""The zoo benchmark's table, findings and notes."""

from __future__ import annotations

from .checks import short


def percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def seconds(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | method | status | params kept | MACs kept | Target(0.5) MACs kept | output shape | "
             "attention invariants | reload equal | structprune s | Torch-Pruning s | Torch-Pruning |",
             "|---|---|---|---:|---:|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        target = r.get("target_status") or percent(r.get("target_macs_ratio"))
        lines.append(f"| {r['model']} | {r['method']} | {short(r['status'])} | {percent(r.get('params_ratio'))} | "
                     f"{percent(r.get('macs_ratio'))} | {short(target, 60)} | {short(r.get('shape', '–'), 80)} | "
                     f"{short(r.get('attention', '–'), 90)} | {short(r.get('reload', '–'), 90)} | "
                     f"{seconds(r.get('seconds'))} | {seconds(r.get('tp_seconds'))} | "
                     f"{short(r.get('tp_status', '–'), 80)} |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """Everything that looks wrong: errors, shape mismatches, reloads not equal, violated invariants, and
    models Torch-Pruning prunes where structprune refuses or prunes nothing."""
    out = []
    for r in rows:
        label = f"{r['model']} / {r['method']}"
        if r["status"].startswith("ERROR") or "ERROR" in r.get("target_status", ""):
            out.append(f"{label}: {r['status'] if r['status'].startswith('ERROR') else r['target_status']}")
        if r.get("shape", "same") != "same":
            out.append(f"{label}: output shape {r['shape']}")
        if r.get("attention", "").startswith("VIOLATED"):
            out.append(f"{label}: attention {r['attention']}")
        if "reload" in r and not r["reload"].startswith("yes"):
            out.append(f"{label}: reload {r['reload']}")
        if r.get("tp_ok") and (r["status"].startswith("refused") or r["status"].startswith("nothing pruned")):
            out.append(f"{label}: Torch-Pruning prunes it ({r['tp_status']}) but structprune: {r['status']}")
    return out


def notes(rows: list[dict]) -> list[str]:
    """Models (one line each) where structprune leaves groups whole that Torch-Pruning's MetaPruner prunes."""
    out = {}
    for r in rows:
        if r.get("tp_ok") and r.get("skipped") and r["model"] not in out:
            out[r["model"]] = (f"{r['model']}: structprune skips {len(r['skipped'])} group(s) "
                               f"({r['skipped'][0]['reason'][:80]}…), params kept {percent(r.get('params_ratio'))}; "
                               f"Torch-Pruning {r['tp_status']}")
    return list(out.values())
