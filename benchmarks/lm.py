"""Decoder LM, heads/KV groups and FFN neurons: structprune's default pipeline against the no-update baselines an LLM
user would otherwise reach for (issue 35, item 6), in one run at the same sizes.

The byte-level Llama-style decoder that ``distill.py --part decoder`` trains on Debian's fortunes (cached in
runs/distill/decoder; trained the same way if absent). Every layer keeps the same share of its key/value groups and
FFN neurons (``--keeps``: 0.5 is half of each; 0.75 three of its four KV groups and three quarters of the FFN);
held-out perplexity on every held-out sentence, no training. Calibration: the first 256 training sentences.

- structprune's default pipeline: i-SpaSP, PFP and magnitude selection, each + least-squares refit.
- No-update baselines (written here as structprune Methods with ``refit=False``, so that every row removes the same
  structures and differs only in the choice and the weights left):
  - **Wanda-sp** (the structured Wanda of An et al., "Fluctuation-based Adaptive Structured Pruning", AAAI 2024):
    a channel's score is Σ |W_ij|·‖X_j‖₂ over the weights of the layer that reads it (o_proj's columns of a KV
    group's heads, down_proj's column of an FFN neuron), ‖X_j‖₂ over the calibration tokens.
  - **FLAP** (same paper), per layer at the same widths (its uniform-structure variant): score Var(X_j)·‖W_:,j‖²
    and the bias compensation W_:,j·mean(X_j) of every removed channel added to the reader's bias (a zero bias is
    added to o_proj and down_proj first: Llama's have none).
  - **Group-L2 magnitude** (Torch-Pruning's MagnitudeImportance, as its LLM example prunes): the L2 norm of every
    weight removed with the channel, no update.
  - i-SpaSP's selection without the refit (its bare step).

    cd benchmarks && ../.venv/bin/python lm.py --out-dir results       # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from distill import decoder_benchmark
from results_io import write_table
from torch import nn

import structprune
from structprune import measure
from structprune.methods.base import GroupView, MethodBase, Needs, Selection, top_k_sorted


class WandaSP(MethodBase):
    """Σ_ij |W_ij|·‖X_j‖₂ of every weight that reads channel j (over its taps: a KV group's head dimensions)."""

    name = "wanda-sp"
    needs = Needs(activations=True)

    def select(self, group: GroupView, keep: int) -> Selection:
        scores = sum((c.weight.double().abs() * c.inputs.double().square().sum(0).sqrt()).sum(dim=(0, 2))
                     for c in group.consumers)
        return Selection(keep_idx=top_k_sorted(scores, keep))


class FLAP(MethodBase):
    """Var(X_j)·‖W_:,j‖² (the fluctuation metric), the removed channels' mean contribution added to the bias."""

    name = "flap"
    needs = Needs(activations=True)

    def select(self, group: GroupView, keep: int) -> Selection:
        scores = sum((c.inputs.double().var(0) * c.weight.double().square().sum(0)).sum(dim=1) for c in group.consumers)
        kept = top_k_sorted(scores, keep)
        removed = torch.ones(group.channels, dtype=torch.bool)
        removed[kept] = False
        biases = {}
        for c in group.consumers:
            mean = c.inputs.double().mean(0)  # (channels, taps)
            shift = torch.einsum("oct,ct->o", c.weight.double()[:, removed], mean[removed])
            biases[c.name] = (c.bias.double() + shift).to(c.bias.dtype)
        return Selection(keep_idx=kept, consumer_biases=biases)


def with_zero_biases(model: nn.Module) -> nn.Module:
    """A copy whose o_proj and down_proj have a zero bias (where FLAP's compensation goes)."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
    return model


#: (label, method, with refit, extra options)
ROWS = [
    ("i-SpaSP + refit (default)", "ispasp", True, {}),
    ("PFP + refit", "pfp", True, {}),
    ("magnitude + refit", "magnitude", True, {}),
    ("Wanda-sp (no update)", WandaSP(), False, {}),
    ("FLAP, bias compensation (no other update)", FLAP(), False, {"flap": True}),
    ("group-L2 magnitude, Torch-Pruning's criterion (no update)", structprune.methods.get("magnitude", norm=2,
                                                                                         coupled=True), False, {}),
    ("i-SpaSP, bare (no update)", "ispasp", False, {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write lm.json/.md here")
    parser.add_argument("--keeps", default="0.5,0.75", help="shares of every layer's KV groups and FFN neurons kept")
    args = parser.parse_args()
    case = decoder_benchmark(256)
    model, calib, test, held_out, dense, params = (case[k] for k in ("model", "calib", "test", "held_out", "dense",
                                                                      "params"))
    print(f"dense: perplexity {dense:.3f}, {params:,} params", flush=True)
    rows = []
    for keep in (float(k) for k in args.keeps.split(",")):
        budget = {"*.self_attn": keep, "*.mlp": keep}
        for label, method, refit, extra in ROWS:
            source = with_zero_biases(model) if extra.get("flap") else model
            start = time.perf_counter()
            result = structprune.prune(source, calib, method, budget, calib[0], refit=refit, progress=False)
            seconds = time.perf_counter() - start
            kept = sum(p.numel() for p in result.model.parameters())  # FLAP's: its added biases too
            rows.append({"keep": keep, "method": label, "perplexity": measure.perplexity(result.model, test),
                         "params_ratio": kept / params,
                         "macs_ratio": result.after["macs"] / result.before["macs"], "seconds": seconds,
                         "kv_groups": [layer["kept"] for layer in result.layers if "self_attn" in layer["group"]]})
            print(f"{keep}: {label}: perplexity {rows[-1]['perplexity']:.3f} in {seconds:.0f} s", flush=True)
    table = [f"Dense perplexity {dense:.3f} on {len(held_out):,} held-out sentences; {params:,} params.", "",
             "| KV groups and FFN neurons kept | method | perplexity | × dense | params kept | MACs kept | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        table.append(f"| {row['keep']:.0%} | {row['method']} | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / dense:.3f} | {row['params_ratio']:.1%} | {row['macs_ratio']:.1%} | "
                     f"{row['seconds']:.0f} |")
    write_table(args.out_dir, "lm", "Decoder LM: the default pipeline vs no-update structured baselines (issue 35)",
                f"cd benchmarks && ../.venv/bin/python lm.py --out-dir results --keeps {args.keeps}",
                [{"dense_perplexity": dense, "params": params}, *rows], table)


if __name__ == "__main__":
    main()
