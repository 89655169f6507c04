"""Reports: Markdown tables and matplotlib plots of evaluations and comparisons."""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path


def eval_table(rows: list[dict]) -> str:
    """A Markdown table of ``structprune eval`` rows (an exported file's params and MACs are those recorded at
    export). Params and MACs kept: of the row's own dense model where the row has one ("dense_params" and
    "dense_macs": a checkpoint that records its pruning), else of the first row's dense model, else of the first
    row. Latency at 1 and 64 samples, and the speed-up at 64 over the first row."""
    first = rows[0]
    fallback = {k: first.get(f"dense_{k}", first[k]) for k in ("params", "macs")}
    several = len(rows) > 1  # a speed-up over the first row
    lines = ["| checkpoint | runtime | accuracy (%) | params | MACs | params kept | MACs kept | "
             "latency b=1 (ms) | latency b=64 (ms) |" + (" speed-up b=64 |" if several else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if several else "")]
    for row in rows:
        base = {k: row.get(f"dense_{k}", fallback[k]) for k in ("params", "macs")}
        speedup = first["latency_median_ms_batch64"] / row["latency_median_ms_batch64"]
        lines.append(f"| {row['checkpoint']} | {row.get('runtime', 'pytorch')} | {row['accuracy']:.2f} | "
                     f"{row['params']:,} | {row['macs']:,} | "
                     f"{row['params'] / base['params']:.1%} | {row['macs'] / base['macs']:.1%} | "
                     f"{_latency(row, 1)} | {_latency(row, 64)} |" + (f" ×{speedup:.2f} |" if several else ""))
    note = "; speed-up: the first row's time at 64 over each row's" if several else ""
    return "\n".join(lines) + f"\n\nLatency: median ± interquartile range of a forward pass at 1 and 64 samples{note}."


def _latency(row: dict, batch: int) -> str:
    return f"{row[f'latency_median_ms_batch{batch}']:.3f} ± {row[f'latency_iqr_ms_batch{batch}']:.3f}"


def compare_table(rows: list[dict], dense_accuracy: float | None, metric: str = "accuracy") -> str:
    """A Markdown table of ``structprune compare`` rows (one per method and target); ``metric``: what the rows
    measured (their ``{metric}_pruned``, ``_finetuned``, ``_distilled``): accuracy, perplexity or
    embedding_cosine_similarity."""
    head, body = _compare_cells(rows, dense_accuracy, metric)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["|" + "|".join(f" {c} " if c else " " for c in cells) + "|" for cells in body]
    return "\n".join(lines)


def _label(metric: str, stage: str) -> str:
    return f"accuracy {stage} (%)" if metric == "accuracy" else f"{metric.replace('_', ' ')} {stage}"


def _compare_cells(rows: list[dict], dense_value: float | None, metric: str = "accuracy"
                   ) -> tuple[list[str], list[list[str]]]:
    """The compare table's header and its rows' cells (the dense row first), for Markdown and HTML alike."""
    extra = [(f"{metric}_{stage}", _label(metric, stage)) for stage in ("finetuned", "distilled")
             if any(f"{metric}_{stage}" in r for r in rows)]
    head = ["method", "target", "MACs kept", "params kept", _label(metric, "pruned")]
    head += [title for _, title in extra]
    head += ["prune time (s)"]
    body = []
    if dense_value is not None:
        body.append(["dense", "1.00", "100.0%", "100.0%", _num(dense_value, metric)] + [""] * len(extra) + [""])
    for r in rows:
        cells = [r["method"], f"{r['target']:.2f}", f"{r['macs_ratio']:.1%}", f"{r['params_ratio']:.1%}",
                 _num(r.get(f"{metric}_pruned"), metric)]
        cells += [_num(r.get(key), metric) for key, _ in extra]
        body.append(cells + [f"{r['prune_seconds']:.2f}"])
    return head, body


def compare_html(rows: list[dict], dense_accuracy: float | None, title: str, plot_png: bytes,
                 details: dict | None = None, metric: str = "accuracy") -> str:
    """One self-contained HTML page (no external files, scripts or fonts): the compare table, the plot embedded
    as a data URI, every run's warnings and the options the runs used."""
    head, body = _compare_cells(rows, dense_accuracy, metric)
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
             + "</tbody></table>")
    warnings = [(r["method"], r["target"], w) for r in rows for w in r.get("warnings") or []]
    notes = ("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(f'{m} at {t:.2f}: {w}')}</li>"
                                               for m, t, w in warnings) + "</ul>") if warnings else ""
    options = ("<h2>Options</h2><pre>" + html.escape(json.dumps(details, indent=2, default=str)) + "</pre>"
               if details else "")
    image = base64.b64encode(plot_png).decode("ascii")
    alt = html.escape(f"{metric.replace('_', ' ')} against the remaining MACs or params, per method")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; }}
td:not(:first-child) {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
{table}
<img alt="{alt}" src="data:image/png;base64,{image}">
{notes}
{options}
<p><small>structprune compare</small></p>
</body></html>
"""


def _num(value, metric: str = "accuracy") -> str:
    digits = {"accuracy": 2, "perplexity": 3}.get(metric, 4)
    return "–" if value is None else f"{value:.{digits}f}"


def plot_compare(rows: list[dict], path: str | os.PathLike, title: str, dense_accuracy: float | None = None,
                 x: str = "macs_ratio", metric: str = "accuracy") -> Path:
    """``metric`` (accuracy, perplexity, ...) vs remaining MACs (or params) per method, pruned (solid), fine-tuned
    (dashed) and distilled (dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    methods: Sequence[str] = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[x])
        color = f"C{i % 10}"
        if any(r.get(f"{metric}_pruned") is not None for r in mine):
            ax.plot([r[x] for r in mine], [r[f"{metric}_pruned"] for r in mine], "o-", color=color, label=method)
        for key, marker, what in ((f"{metric}_finetuned", "s--", "fine-tuned"), (f"{metric}_distilled", "^:",
                                                                                  "distilled")):
            if any(key in r for r in mine):
                ax.plot([r[x] for r in mine], [r[key] for r in mine], marker, color=color, label=f"{method} ({what})")
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="black", linestyle=":", label="dense")
    ax.set_xlabel("remaining MACs (fraction of dense)" if x == "macs_ratio" else "remaining params (fraction)")
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else f"held-out {metric.replace('_', ' ')}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_png(plt, fig, path)


def allocation_table(report: dict) -> str | None:
    """A Markdown table of the widths a pruning report chose per group (its ``layers`` and ``budget``): channels,
    kept, the share kept and, for ``Target(allocation="error")``, the width one ratio for every group would have
    kept at the same target and the predicted error of each group's width (its network output error alone), with
    the predicted total (the groups' sum) against the measured one (all pruned together). None without layers."""
    layers = _groups(report)
    if not layers:
        return None
    budget = report.get("budget") or {}
    uniform = budget.get("uniform_keeps") or {}
    predicted = budget.get("predicted_error") or {}
    head = ["group", "channels", "kept", "kept (%)"] + (["uniform"] if uniform else []) + (
        ["predicted error"] if predicted else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for layer in layers:
        name = layer["group"]
        cells = [name, str(layer["channels"]), str(layer["kept"]), f"{100 * layer['kept'] / layer['channels']:.0f}"]
        if uniform:
            cells.append(str(uniform.get(name, "–")))
        if predicted:
            cells.append(f"{predicted[name]:.2e}" if name in predicted else "–")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    allocation = budget.get("allocation", budget.get("budget", "?"))
    text += f"\n\nAllocation: {allocation}"
    if "measured_error" in budget:
        total = budget.get("predicted_error_total")
        text += ("; network output error (squared, relative to the dense output's energy on the probe samples): "
                 + ("" if total is None else f"predicted {total:.2e} (each group alone, summed), ")
                 + f"measured {budget['measured_error']:.2e} (all groups pruned, after the recovery)")
    if budget.get("candidates"):
        errors = ", ".join(f"{name} {c['validation_error']:.2e}" for name, c in budget["candidates"].items())
        text += (f". Candidates pruned and checked on held-out calibration samples (output error): {errors}; "
                 f"kept: {budget.get('chosen')}")
    return text + "."


def plot_allocation(report: dict, path: str | os.PathLike, title: str) -> Path:
    """Per-group keep ratios of a pruning report, shallow to deep: the chosen ones (bars) and, for the error
    allocation, the uniform allocation's at the same target (markers)."""
    plt = _pyplot()
    layers = _groups(report)
    if not layers:
        raise ValueError("the report records no per-group widths")
    uniform = (report.get("budget") or {}).get("uniform_keeps") or {}
    names = [layer["group"] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    positions = range(len(names))
    ax.bar(positions, [layer["kept"] / layer["channels"] for layer in layers], color="C0", label="chosen")
    if uniform:
        ax.plot([i for i, n in zip(positions, names, strict=True) if n in uniform],
                [uniform[layer["group"]] / layer["channels"] for layer in layers if layer["group"] in uniform],
                "o", color="C1", label="one ratio for every group")
        ax.legend(fontsize=8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("channels kept (fraction)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save_png(plt, fig, path)


def _groups(report: dict) -> list[dict]:
    """A pruning report's per-group entries (its ``layers`` that name a group), shallow to deep."""
    return [layer for layer in report.get("layers") or [] if "group" in layer]


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt, fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
