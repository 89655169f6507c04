"""What the zoo benchmark checks on a pruned model: its outputs' shapes, the attention invariants, the status."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from structprune import attention
from structprune.errors import first_line
from structprune.layers import is_attention, weight_matrix


def output_tensors(out, prefix: str = "out") -> dict[str, Tensor]:
    """Every tensor of a model's output by a path name (a ModelOutput is a dict); the key/value cache is left
    out (its shape follows the kept heads by design)."""
    if isinstance(out, Tensor):
        return {prefix: out}
    if isinstance(out, dict):
        items = [(k, v) for k, v in out.items() if k != "past_key_values"]
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        return {}
    tensors: dict[str, Tensor] = {}
    for key, value in items:
        tensors.update(output_tensors(value, f"{prefix}.{key}"))
    return tensors


def run(model: nn.Module, batch) -> dict[str, Tensor]:
    with torch.no_grad():
        return output_tensors(model(**batch) if isinstance(batch, dict) else model(batch))


def max_diff(got: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    if set(got) != set(expected) or any(got[k].shape != expected[k].shape for k in expected):
        return float("inf")
    return max((float((got[k].float() - expected[k].float()).abs().max()) for k in expected), default=0.0)


def check_shapes(dense: dict[str, Tensor], pruned: dict[str, Tensor]) -> str:
    want = {k: tuple(v.shape) for k, v in dense.items()}
    got = {k: tuple(v.shape) for k, v in pruned.items()}
    if want == got:
        return "same"
    diff = [f"{k}: {want.get(k)} → {got.get(k)}" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    return "MISMATCH " + "; ".join(diff[:3])


def attention_invariants(dense: nn.Module, pruned: nn.Module) -> str:
    """The head geometry of every described block is whole and consistent (tests/test_attention_families.py's
    _check_heads_whole), the config records the sizes, and every attention module that no layout describes is
    exactly as it was; "–" for a model without attention."""
    problems: list[str] = []
    blocks = attention.find_blocks(pruned)[0]
    for block in blocks:
        d, layout, module = block.head_dim, block.layout, block.module
        width = weight_matrix(block.layer(layout.output)).shape[1]
        if layout.fused:
            rows = weight_matrix(block.layer(layout.fused)).shape[0]
            if rows != 3 * width:
                problems.append(f"{block.name}: fused rows {rows} != 3×{width}")
        else:
            q, k, v = (weight_matrix(block.layer(p)).shape[0] for p in (layout.query, layout.key, layout.value))
            if not (q == width and k == v and k % d == 0 and (q // d) % max(k // d, 1) == 0):
                problems.append(f"{block.name}: q/k/v/o {q}/{k}/{v}/{width} with head_dim {d}")
        if width % d:
            problems.append(f"{block.name}: width {width} not a multiple of head_dim {d}")
        for attr in layout.heads:
            value = attention.attribute(module, attr)
            if value is not None and value != width // d:
                problems.append(f"{block.name}.{attr} = {value}, weights say {width // d}")
        for attr in layout.widths:
            value = attention.attribute(module, attr)
            if value not in (None, width):
                problems.append(f"{block.name}.{attr} = {value}, weights say {width}")
    config = getattr(pruned, "config", None)
    if config is not None and blocks:
        recorded = getattr(config, "structprune_layers", None)
        if recorded != attention.layer_sizes(pruned):
            problems.append("config.structprune_layers != layer_sizes" + (" (absent)" if recorded is None else ""))
    described = {id(m) for b in blocks for m in b.module.modules()}
    dense_params = {name: tuple(p.shape) for name, p in dense.named_parameters()}
    undescribed = 0
    for name, module in pruned.named_modules():
        if id(module) in described or not is_attention(module):
            continue
        described |= {id(m) for m in module.modules()}
        undescribed += 1
        changed = [f"{name}.{p}" for p, param in module.named_parameters()
                   if dense_params.get(f"{name}.{p}".lstrip(".")) != tuple(param.shape)]
        if changed:
            problems.append(f"undescribed attention {name} changed: {', '.join(changed[:2])}")
    if not blocks and not undescribed:
        return "–"
    if problems:
        return "VIOLATED: " + "; ".join(problems[:3])
    parts = ([f"{len(blocks)} blocks whole"] if blocks else []) + (
        [f"{undescribed} undescribed left as they were"] if undescribed else [])
    return "ok (" + ", ".join(parts) + ")"


def status_of(result) -> str:
    pruned_any = any(layer["kept"] < layer["channels"] for layer in result.layers)
    prefix = "" if pruned_any else "nothing pruned; "
    if result.skipped:
        return f"{prefix}skipped groups: {len(result.skipped)} ({result.skipped[0]['reason']})"
    if not pruned_any:
        return "nothing pruned" + (f" ({result.warnings[0]})" if result.warnings else "")
    return "pruned"


TEMPORARY: list[str] = []  # the temporary folder's path, left out of messages


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {first_line(exc)}"
    for tmp in TEMPORARY:
        text = text.replace(tmp + "/", "")
    return text


def short(text: str, limit: int = 110) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
