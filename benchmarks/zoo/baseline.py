"""Torch-Pruning's MetaPruner (L2 magnitude, half of every group) on the same model: the reference."""

from __future__ import annotations

import copy
import time
import warnings

import torch_pruning as tp
from torch import Tensor, nn

from .checks import check_shapes, error_text, run
from .specs import Spec


def output_layer(model: nn.Module) -> list[nn.Module]:
    """The output layer to keep whole: the last Linear (the classifier head) of a CNN."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def torch_pruning(spec: Spec, model: nn.Module, example, dense_out: dict[str, Tensor], batch) -> dict:
    if spec.tp.startswith("n/a"):
        return {"tp_status": spec.tp, "tp_seconds": None}
    model = copy.deepcopy(model)
    params = sum(p.numel() for p in model.parameters())
    importance = tp.importance.MagnitudeImportance(p=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            if spec.tp == "bert":  # benchmarks/bert.py's torch_pruning_reference, heads and FFN at once
                layers = list(model.encoder.layer)
                ratios, num_heads = {}, {}
                for layer in layers:
                    attn = layer.attention.self
                    ratios[attn.query] = 0.5
                    ratios[layer.intermediate.dense] = 0.5
                    for proj in (attn.query, attn.key, attn.value):
                        num_heads[proj] = attn.num_attention_heads
                ignored = [model.pooler] if getattr(model, "pooler", None) is not None else []
                pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=0.0,
                                              pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=True,
                                              prune_head_dims=False, head_pruning_ratio=0.5, ignored_layers=ignored)
                pruner.step()
                for layer in layers:
                    attn = layer.attention.self
                    attn.all_head_size = attn.query.out_features
                    attn.num_attention_heads = attn.all_head_size // attn.attention_head_size
            else:
                pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=0.5,
                                              ignored_layers=output_layer(model))
                pruner.step()
            seconds = time.perf_counter() - start
    except Exception as exc:
        return {"tp_status": f"ERROR {error_text(exc)}", "tp_seconds": None}
    kept = sum(p.numel() for p in model.parameters()) / params
    try:
        shapes = check_shapes(dense_out, run(model.eval(), batch))
    except Exception as exc:
        return {"tp_status": f"pruned, forward fails ({error_text(exc)})", "tp_seconds": seconds,
                "tp_params_ratio": kept}
    ok = shapes == "same"
    return {"tp_status": (f"ok (params {kept:.0%})" if ok else f"output {shapes}"), "tp_seconds": seconds,
            "tp_params_ratio": kept, "tp_ok": ok}
