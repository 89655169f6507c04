"""i-SpaSP's synthetic experiment: residual vs kept size on two-layer ReLU nets with p-compressible hidden layers.

As in Wolfe & Kyrillidis (L4DC 2022): a two-layer network f(x) = W₂·relu(W₁x) with hidden width N
(100 and 200) whose hidden representation is p-compressible — hidden unit i (in a random order) has
RMS activation i^(−1/p) on the inputs, so the sorted magnitudes decay like i^(−1/p) — for
p ∈ {0.3, 0.5, 0.7, 0.9}. Units have random negative biases (they fire on 2% to 50% of the inputs),
so their weight norms are a poor guide to their activity.
Each net is pruned to s hidden units with i-SpaSP (the paper's proxy, T = 20), magnitude and random
selection, on 1,000 Gaussian inputs; the plot shows ‖f(X) − f_S(X)‖²_F / ‖f(X)‖²_F against s on log
scales (straight lines = polynomial decay), averaged over 5 seeds. The slope of log residual vs
log s, fitted for s ≤ N/2, is printed for each p next to 1 − 2/p, the rate of the best s-term
approximation of a p-compressible vector (squared): the theory says the decay is polynomial in s,
faster for smaller p.

    python benchmarks/ispasp_synthetic.py --out-dir benchmarks/results      # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import warnings
from datetime import date
from pathlib import Path

import torch
from results_io import pyplot, write_results
from torch import nn

import structprune

PS = (0.3, 0.5, 0.7, 0.9)
WIDTHS = (100, 200)
METHODS = ("ispasp", "magnitude", "random")
INPUTS, OUTPUTS, SAMPLES = 20, 10, 1000


def compressible_net(width: int, p: float, seed: int, x: torch.Tensor) -> nn.Module:
    """Random W₁ with random negative biases (units fire on 2% to 50% of inputs, so weight norms say
    little about activity), then each unit rescaled so that its RMS activation on ``x`` is i^(−1/p)
    (units in a random order): the hidden representation is p-compressible by construction."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(INPUTS, width), nn.ReLU(), nn.Linear(width, OUTPUTS, bias=False))
    with torch.no_grad():
        w = torch.randn(width, INPUTS, generator=gen) / INPUTS**0.5
        net[0].weight.copy_(w)
        net[0].bias.copy_(-2 * torch.rand(width, generator=gen) * w.norm(dim=1))  # w·x has std ‖w‖
        net[2].weight.copy_(torch.randn(OUTPUTS, width, generator=gen) / width**0.5)
        rms = net[1](net[0](x)).square().mean(dim=0).sqrt().clamp(min=1e-8)
        target = torch.arange(1, width + 1, dtype=torch.float32).pow(-1 / p)[torch.randperm(width, generator=gen)]
        factor = target / rms  # relu is positively homogeneous: scaling a unit's row and bias scales its output
        net[0].weight.mul_(factor[:, None])
        net[0].bias.mul_(factor)
    return net.eval()


def residual(net: nn.Module, x: torch.Tensor, method: str, keep: int) -> float:
    width = net[0].out_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"proxy": "paper"} if method == "ispasp" else {}  # the paper's algorithm, its selection alone
        result = structprune.prune(net, [(x, torch.zeros(len(x), dtype=torch.long))], method, keep / width,
                                   calib_samples=len(x), progress=False, seed=keep, refit=False, recalibrate=False,
                                   **options)
    with torch.no_grad():
        dense, pruned = net(x), result.model(x)
    return float((dense - pruned).square().sum() / dense.square().sum())


def slope(points: list[tuple[int, float]], width: int) -> float:
    """Least-squares slope of log residual against log s for s <= width/2."""
    pts = [(math.log(s), math.log(r)) for s, r in points if s <= width // 2 and r > 0]
    mx, my = sum(a for a, _ in pts) / len(pts), sum(b for _, b in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for ispasp_synthetic.json/.md/.png")
    parser.add_argument("--seeds", type=int, default=5, help="nets per (width, p), averaged (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(SAMPLES, INPUTS, generator=torch.Generator().manual_seed(1234))
    curves = {}
    for width in WIDTHS:
        sizes = sorted({max(1, round(width * f)) for f in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)})
        for p in PS:
            nets = [compressible_net(width, p, seed, x) for seed in range(args.seeds)]
            for method in METHODS:
                curve = [(s, sum(residual(net, x, method, s) for net in nets) / len(nets)) for s in sizes]
                curves[f"{width}/{p}/{method}"] = curve
                print(f"N={width} p={p} {method:9s} slope {slope(curve, width):6.2f}  "
                      + " ".join(f"{s}:{r:.1e}" for s, r in curve), flush=True)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, 1 thread", "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv), "seeds": args.seeds, "samples": SAMPLES}
    lines = [f"Two-layer ReLU nets, {INPUTS} inputs, {OUTPUTS} outputs, {SAMPLES} samples, mean of {args.seeds} "
             f"seeds; {meta['date']}; `{meta['command']}`", "",
             "Slope of log(relative ‖residual‖²) vs log(s), s ≤ N/2 (more negative = faster decay):", "",
             "| N | p | best s-term rate 1 − 2/p | i-SpaSP | magnitude | random | residual at s = N/10: i-SpaSP / "
             "magnitude / random |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for width in WIDTHS:
        for p in PS:
            row = [slope(curves[f"{width}/{p}/{m}"], width) for m in METHODS]
            at = " / ".join(f"{dict(curves[f'{width}/{p}/{m}'])[round(width * 0.1)]:.1e}" for m in METHODS)
            lines.append(f"| {width} | {p} | {1 - 2 / p:.2f} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {at} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = write_results(args.out_dir, "ispasp_synthetic", {"meta": meta, "curves": curves}, text)
    if out is not None:
        plot(curves, out / "ispasp_synthetic.png")


def plot(curves: dict, path: Path) -> None:
    plt = pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ispasp": "-", "magnitude": "--", "random": ":"}
    for ax, width in zip(axes, WIDTHS, strict=True):
        for i, p in enumerate(PS):
            for method in METHODS:
                pts = curves[f"{width}/{p}/{method}"]
                ax.plot(*zip(*pts, strict=True), linestyle=styles[method], marker="o" if method == "ispasp" else None,
                        markersize=3, color=plt.get_cmap("viridis")(i / len(PS)),
                        label=f"p={p} {method}" if method == "ispasp" or i == 0 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"hidden width N = {width}")
        ax.set_xlabel("kept hidden units s")
        ax.set_ylabel("‖f(X) − f_S(X)‖² / ‖f(X)‖²")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
