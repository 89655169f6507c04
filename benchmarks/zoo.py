"""Model zoo: does the default pipeline prune every architecture right, or refuse it cleanly?

Every model is built in-process and tiny (random weights, no downloads): structprune's own zoo CNNs; CNNs in
the style of Torch-Pruning's CIFAR zoo written below (PreAct-ResNet, GoogLeNet-like inception with torch.cat
branches, DenseNet-like concatenation, SE-ResNet, ResNeXt-like grouped convs, a Conv1d net, an
nn.TransformerEncoder classifier); Hugging Face transformers from tiny configs (the families
structprune.models.hf describes, and T5/BART, which it does not); torchvision and timm models when they are
installed. Each is pruned with ``structprune.prune(model, calib, method, 0.5, progress=False)`` (a keep ratio
of 0.5 for every group, the default pipeline: selection, refit, BatchNorm recalibration) for i-SpaSP, PFP and
magnitude on 64 synthetic calibration samples, and checked:

* status: pruned / refused (StructPruneError) / groups skipped with a warning / ERROR (any other exception:
  a bug);
* params and MACs kept (the report's after/before), and for the CNNs the MACs kept with ``Target(0.5)``;
* every output tensor (last_hidden_state, logits, ...) has the dense model's shape;
* transformer invariants: every block's q/k/v/o sizes are whole heads and consistent, the head counts the
  modules keep agree with their weights, ``config.structprune_layers == attention.layer_sizes(model)``;
  attention modules structprune does not describe (nn.MultiheadAttention, T5, BART) are left exactly as
  they were;
* the model saved with ``structprune.save`` loads in a fresh process (one for all models, at the end) and
  gives the same outputs on a fixed batch (max abs diff ≤ 1e-5);
* Torch-Pruning's MetaPruner (L2 magnitude, pruning_ratio=0.5, the output layer ignored) on the same model:
  its time and whether the pruned model runs with the dense output shapes. For BERT/RoBERTa it gets the
  q/k/v head counts and the per-layer patching of benchmarks/bert.py; for the other transformers it is not
  run ("n/a": MetaPruner needs each family's heads configured by hand).

    cd benchmarks && ../.venv/bin/python zoo.py --out-dir results     # ~75 s on 1 CPU thread
    ../.venv/bin/python zoo.py --models resnet20,bert --methods magnitude     # a subset
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
METHODS = ("ispasp", "pfp", "magnitude")
RELOAD_TOLERANCE = 1e-5
CALIB_BATCHES, CALIB_BATCH = 2, 32  # 64 calibration samples
CANONICAL_COMMAND = "cd benchmarks && ../.venv/bin/python zoo.py --out-dir results"


# -- CNNs in the style of Torch-Pruning's CIFAR zoo (small; 1×28×28 inputs) ------------------------------------
# Built through structprune.models.create("zoo:Name"), so that a checkpoint names them as importable classes
# (this file is imported as the module "zoo" from benchmarks/) and loads in a fresh process.


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU()]


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """PreAct-ResNet (He et al. 2016b): BN-ReLU before each conv, one block per stage."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(width, width), PreActBlock(width, 2 * width, 2),
                                    PreActBlock(2 * width, 4 * width, 2))
        self.bn = nn.BatchNorm2d(4 * width)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Inception(nn.Module):
    """GoogLeNet's inception module: 1×1, 1×1→3×3, 1×1→3×3→3×3 and pool→1×1 branches, concatenated."""

    def __init__(self, cin: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int):
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(cin, n1, 1))
        self.b2 = nn.Sequential(*_conv_bn(cin, n3r, 1), *_conv_bn(n3r, n3))
        self.b3 = nn.Sequential(*_conv_bn(cin, n5r, 1), *_conv_bn(n5r, n5), *_conv_bn(n5, n5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.pre = nn.Sequential(*_conv_bn(in_channels, 16))
        self.a3 = Inception(16, 8, 8, 12, 4, 4, 4)  # 28 channels out
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b3 = Inception(28, 12, 8, 16, 4, 8, 8)  # 44 channels out
        self.linear = nn.Linear(44, num_classes)

    def forward(self, x):
        out = self.b3(self.pool(self.a3(self.pre(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class DenseBottleneck(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class DenseNetSmall(nn.Module):
    """DenseNet-BC-like: two dense blocks of three bottlenecks (growth 4) with a transition between."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, growth: int = 4):
        super().__init__()
        width = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage in range(2):
            for _ in range(3):
                blocks.append(DenseBottleneck(width, growth))
                width += growth
            if stage == 0:
                blocks += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                width //= 2
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite; the gate is a lambda held by the module."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = lambda t: torch.sigmoid(t)  # noqa: E731  (a lambda inside a module, on purpose)

    def forward(self, x):
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(torch.relu(self.fc1(w))))


class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.se(self.body(x)) + self.shortcut(x))


class SEResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width))
        self.layers = nn.Sequential(SEBlock(width, width), SEBlock(width, 2 * width, 2),
                                    SEBlock(2 * width, 4 * width, 2))
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1×1 → grouped 3×3 (cardinality 4) → 1×1, plus the shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, cardinality: int = 4):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), *_conv_bn(width, width, 3, stride, cardinality),
                                  nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNeXtSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 16))
        self.layers = nn.Sequential(ResNeXtBlock(16, 16, 32), ResNeXtBlock(32, 32, 64, 2))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Conv1dNet(nn.Module):
    """A 1-d sequence classifier (2 channels × 32 steps): conv-BN-ReLU stack, a residual block, global pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16))
        self.down = nn.Sequential(nn.Conv1d(16, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.stem(x)
        out = self.down(torch.relu(out + self.block(out)))
        return self.linear(out.mean(-1))


class TorchTransformerClassifier(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention) over 8 steps of 6 features, mean-pooled, a Linear head."""

    def __init__(self, num_classes: int = 10, features: int = 6, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


# -- the model list -------------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    kind: str  # "cnn" (also Target(0.5)), "seq" (other non-transformers), "hf" (transformers), "external"
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], object]  # (samples, seed) -> a batch the model takes
    tp: str = "generic"  # how Torch-Pruning runs: "generic", "bert" (hand-configured heads) or "n/a (why)"
    requires: str | None = None  # a package that must be importable


def _images(channels: int = 1, size: int = 28) -> Callable[[int, int], Tensor]:
    return lambda n, seed: torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _sequences(channels: int, steps: int, channels_last: bool = False) -> Callable[[int, int], Tensor]:
    shape = (steps, channels) if channels_last else (channels, steps)
    return lambda n, seed: torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _tokens(n: int, seed: int) -> dict:
    return {"input_ids": torch.randint(2, 50, (n, 9), generator=torch.Generator().manual_seed(seed))}


def _zoo(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import structprune

        return structprune.models.create(name, num_classes=10, in_channels=1, **kwargs)

    return build


def _local(cls: str, **kwargs) -> Callable[[], nn.Module]:
    return _imported(f"zoo:{cls}", **kwargs)  # a class of this file, importable as zoo:<cls>


def _imported(spec: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import structprune

        return structprune.models.create(spec, **kwargs)  # records the import, for structprune.load

    return build


WIDTH, HEADS, INNER = 32, 4, 64
TEXT = dict(vocab_size=50, max_position_embeddings=32)


def _hf(cls: str, config: Callable[[object], object]) -> Callable[[], nn.Module]:
    def build():
        import transformers

        return getattr(transformers, cls)(config(transformers))

    return build


HF_NA = "n/a (MetaPruner needs this family's heads configured by hand)"

SPECS = [
    Spec("resnet20", "cnn", _zoo("resnet20"), _images()),
    Spec("resnet56", "cnn", _zoo("resnet56", width_mult=0.5), _images()),
    Spec("vgg16", "cnn", _zoo("vgg16", width_mult=0.25), _images()),
    Spec("mobilenetv2", "cnn", _zoo("mobilenetv2", width_mult=0.25), _images()),
    Spec("lenet5", "cnn", _zoo("lenet5"), _images()),
    Spec("preact-resnet", "cnn", _local("PreActResNet"), _images()),
    Spec("googlenet-like", "cnn", _local("GoogLeNetSmall"), _images()),
    Spec("densenet-like", "cnn", _local("DenseNetSmall"), _images()),
    Spec("se-resnet", "cnn", _local("SEResNet"), _images()),
    Spec("resnext-like", "cnn", _local("ResNeXtSmall"), _images()),
    Spec("conv1d", "seq", _local("Conv1dNet"), _sequences(2, 32)),
    Spec("nn-transformer", "seq", _local("TorchTransformerClassifier"), _sequences(6, 8, channels_last=True)),
    Spec("bert", "hf", _hf("BertModel", lambda t: t.BertConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=INNER, **TEXT)),
         _tokens, tp="bert"),
    Spec("roberta", "hf", _hf("RobertaModel", lambda t: t.RobertaConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=INNER, pad_token_id=1,
        **TEXT)), _tokens, tp="bert"),
    Spec("albert", "hf", _hf("AlbertModel", lambda t: t.AlbertConfig(
        embedding_size=8, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=INNER,
        **TEXT)), _tokens, tp=HF_NA),
    Spec("distilbert", "hf", _hf("DistilBertModel", lambda t: t.DistilBertConfig(
        dim=WIDTH, n_layers=2, n_heads=HEADS, hidden_dim=INNER, **TEXT)), _tokens, tp=HF_NA),
    Spec("vit", "hf", _hf("ViTModel", lambda t: t.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=INNER)), _images(3, 16), tp=HF_NA),
    Spec("vit-classifier", "hf", _hf("ViTForImageClassification", lambda t: t.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=INNER, num_labels=10)), _images(3, 16), tp=HF_NA),
    Spec("llama-gqa", "hf", _hf("LlamaModel", lambda t: t.LlamaConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=INNER, **TEXT)), _tokens, tp=HF_NA),
    Spec("gpt2", "hf", _hf("GPT2Model", lambda t: t.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=HEADS, n_inner=INNER, bos_token_id=0,
        eos_token_id=0)), _tokens, tp=HF_NA),
    # T5 structprune does not describe (its relative position bias is per head and shared between layers):
    # expected refused or skipped, never pruned wrong; BART is described (BartModel's output holds a cache
    # object, which Torch-Pruning's tracer could not read: no longer traced)
    Spec("t5-encoder", "hf", _hf("T5EncoderModel", lambda t: t.T5Config(
        vocab_size=50, d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=INNER, num_layers=2, num_heads=HEADS,
        decoder_start_token_id=0)), _tokens, tp=HF_NA),
    Spec("bart", "hf", _hf("BartModel", lambda t: t.BartConfig(
        d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=INNER, decoder_ffn_dim=INNER, **TEXT)), _tokens, tp=HF_NA),
    # the same with use_cache=False in every batch (BartModel's default output holds a cache object)
    Spec("bart-nocache", "hf", _hf("BartModel", lambda t: t.BartConfig(
        d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=INNER, decoder_ffn_dim=INNER, **TEXT)),
         lambda n, seed: {**_tokens(n, seed), "use_cache": False}, tp=HF_NA),
    Spec("tv-resnet18", "external", _imported("torchvision:resnet18", num_classes=10), _images(3, 32),
         requires="torchvision"),
    Spec("tv-mobilenet_v3_small", "external", _imported("torchvision:mobilenet_v3_small", num_classes=10),
         _images(3, 32), requires="torchvision"),
    Spec("timm-vit_tiny", "external", lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
         _images(3, 32), tp="n/a (heads need hand-configuration)", requires="timm"),
]


def _timm(name: str, **kwargs) -> nn.Module:
    import structprune

    return structprune.models.create(f"timm:{name}", num_classes=10, **kwargs)  # the registry, by name


# -- checks ---------------------------------------------------------------------------------------------------


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
    from structprune import attention
    from structprune.graph import is_attention, weight_matrix

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
            value = attention._get(module, attr)
            if value is not None and value != width // d:
                problems.append(f"{block.name}.{attr} = {value}, weights say {width // d}")
        for attr in layout.widths:
            value = attention._get(module, attr)
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


_TMP: list[str] = []  # the temporary folder's path, left out of messages


def error_text(exc: BaseException) -> str:
    from structprune.errors import first_line

    text = f"{type(exc).__name__}: {first_line(exc)}"
    for tmp in _TMP:
        text = text.replace(tmp + "/", "")
    return text


def short(text: str, limit: int = 110) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- Torch-Pruning's reference --------------------------------------------------------------------------------


def output_layer(model: nn.Module) -> list[nn.Module]:
    """The output layer to keep whole: the last Linear (the classifier head) of a CNN."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def torch_pruning(spec: Spec, model: nn.Module, example, dense_out: dict[str, Tensor], batch) -> dict:
    import torch_pruning as tp

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


# -- one model ------------------------------------------------------------------------------------------------


def measure(spec: Spec, methods: list[str], target: bool, store: Path) -> list[dict]:
    import structprune
    from structprune.errors import StructPruneError

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


# -- reload in a fresh process --------------------------------------------------------------------------------


def reload_all(rows: list[dict], store: Path) -> None:
    """Load every saved model in one fresh process (this script with --check-reload) and fill rows' "reload"."""
    saved = {f"{r['model']}-{r['method']}": r["saved"] for r in rows if "saved" in r}
    if not saved:
        return
    manifest = store / "manifest.json"
    manifest.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check-reload", str(manifest)],
                          capture_output=True, text=True, timeout=600, cwd=HERE)
    try:
        answers = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answers = {}
    for r in rows:
        key = f"{r['model']}-{r['method']}"
        if key in saved:
            answer = answers.get(key)
            if answer is None:
                r["reload"] = f"no answer from the fresh process (rc {proc.returncode}: {short(proc.stderr, 200)})"
            elif "error" in answer:
                r["reload"] = f"load ERROR {answer['error']}"
                r["reload_traceback"] = answer.get("traceback")
            else:
                diff = answer["diff"]
                r["reload_diff"] = diff
                r["reload"] = f"{'yes' if diff <= RELOAD_TOLERANCE else 'no'} ({diff:.1e})"


def check_reload(manifest: str) -> None:
    """The fresh process: load each saved model, run it on its batch, print {key: {"diff"} or {"error"}}."""
    sys.path.insert(0, str(HERE))
    _TMP.append(str(Path(manifest).parent))
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    import structprune

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    answers = {}
    for key, path in json.loads(Path(manifest).read_text()).items():
        try:
            io = torch.load(Path(manifest).parent / f"{key}.io.pt", weights_only=True)
            model = structprune.load(path)
            answers[key] = {"diff": max_diff(run(model, io["batch"]), io["expected"])}
        except Exception as exc:
            answers[key] = {"error": error_text(exc), "traceback": traceback.format_exc()}
    print(json.dumps(answers))


# -- report ---------------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _secs(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | method | status | params kept | MACs kept | Target(0.5) MACs kept | output shape | "
             "attention invariants | reload equal | structprune s | Torch-Pruning s | Torch-Pruning |",
             "|---|---|---|---:|---:|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        target = r.get("target_status") or _pct(r.get("target_macs_ratio"))
        lines.append(f"| {r['model']} | {r['method']} | {short(r['status'])} | {_pct(r.get('params_ratio'))} | "
                     f"{_pct(r.get('macs_ratio'))} | {short(target, 60)} | {short(r.get('shape', '–'), 80)} | "
                     f"{short(r.get('attention', '–'), 90)} | {short(r.get('reload', '–'), 90)} | "
                     f"{_secs(r.get('seconds'))} | {_secs(r.get('tp_seconds'))} | "
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
                               f"({r['skipped'][0]['reason'][:80]}…), params kept {_pct(r.get('params_ratio'))}; "
                               f"Torch-Pruning {r['tp_status']}")
    return list(out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    sys.path.insert(0, str(HERE))  # zoo:<Class> imports this file as the module "zoo"
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
        _TMP.append(tmp)
        for spec in SPECS:
            if spec.name in chosen:
                rows += measure(spec, methods, target=not (args.quick or args.no_target), store=Path(tmp))
        reload_all(rows, Path(tmp))
    for r in rows:
        r.pop("saved", None)
    total = time.perf_counter() - start
    import torch_pruning
    import transformers

    command = ("cd benchmarks && ../.venv/bin/python zoo.py " + " ".join(sys.argv[1:])).strip()
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
    from results_io import write_results

    payload = {"meta": meta, "rows": rows, "findings": found, "notes": noted}
    write_results(args.out_dir, "zoo", payload, header + text + footer)


if __name__ == "__main__":
    main()
