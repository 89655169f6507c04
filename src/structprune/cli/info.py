"""``structprune info``: the prunable groups of a model (channels, producers, consumers), its size, what is kept
whole and why; for a model structprune pruned, the widths its pruning chose per group (and a plot of them)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint, measure, report
from ..errors import StructPruneError
from ..graph import build_graph
from . import common, options

DESCRIPTION = ("List the prunable groups of a checkpoint (or a zoo model): channels, producers and consumers.")


def register(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?", help="checkpoint to inspect")
    options.add_model(src)
    src.add_argument("--hf-model", metavar="DIR", help="inspect a local Hugging Face language model directory "
                                                       "(sizes counted for one sequence of 128 tokens, or the "
                                                       "model's maximum if shorter)")
    options.add_model_options(p)
    options.add_dataset(p)
    options.add_trust(p)
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="write the per-group keep ratios the pruning chose (and, for --allocation error, the uniform "
                        "allocation's at the same target) to this PNG; for a model structprune pruned")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")


def run(args) -> int:
    source = args.checkpoint or args.hf_model
    pruning = common.recorded_report(source, args) if source else {}
    table = report.allocation_table(pruning)
    if args.plot is not None:  # refused before any work
        if table is None:
            raise StructPruneError("--plot: this model records no pruning report with per-group widths (a checkpoint "
                                   "or model directory that structprune prune wrote has one)")
        common.check_output(Path(args.plot), args.force, what="--plot:")
    model, example, title = _model(args)
    graph = build_graph(model, example)
    groups = graph.all_groups()
    size = measure.count(model, example)
    print(f"{title}: {size['params']:,} params, {size['macs']:,} MACs, {len(groups)} prunable groups")
    print("| # | group | channels | producers | consumers |")
    print("|---:|---|---:|---|---|")
    for i, group in enumerate(groups):
        print(f"| {i} | {group.name} | {group.channels} | {', '.join(p.name for p in group.producers)} | "
              f"{', '.join(c.name for c in group.consumers)} |")
    if hasattr(graph, "output_layers"):
        outputs = ", ".join(graph.name_of(m) for m in graph.output_layers)
        print(f"output layers (never pruned): {outputs}")
    for name, reason in graph.skipped:
        print(f"skipped: {name}: {reason}")
    if table is not None:
        print(f"\nwidths chosen by its pruning ({pruning.get('method', '?')}):")
        print(table)
    if args.plot is not None:
        report.plot_allocation(pruning, args.plot, f"{title}: channels kept per group")
        print(f"plot -> {args.plot}")
    return 0


def _model(args):
    """(model, example input, title) of what the command line names."""
    common.refuse_model_options(args)
    if args.model is not None and args.model.startswith("hf:"):
        args.hf_model, args.model = args.model[len("hf:"):], None
    if args.hf_model:
        model = common.hf_model(args.hf_model, args.trust_checkpoint)
        tokens = min(128, common.max_positions(model))
        example = {"input_ids": torch.zeros(1, tokens, dtype=torch.long),
                   "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
        return model, example, args.hf_model
    if args.checkpoint:
        common.use_recorded_data(args, args.checkpoint)
        model = common.load(args.checkpoint, args)
        example = checkpoint.example_input(model)
        if example is None:
            raise StructPruneError(f"{args.checkpoint} does not record its input shape")
        return model, example, args.checkpoint
    model = common.model_from(args, doing=None)  # the sizes and groups do not depend on the weights
    example = common.example(args)
    common.check_fits(model, args, example)
    weights = "fresh" if args.weights is None else f"weights {args.weights}"
    return model, example, f"{args.model} ({weights}, {args.data} inputs)"
