"""The zoo benchmark's model list: how each model is built and what batches it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import structprune

METHODS = ("ispasp", "pfp", "magnitude")
CALIB_BATCHES, CALIB_BATCH = 2, 32  # 64 calibration samples


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
        return structprune.models.create(name, num_classes=10, in_channels=1, **kwargs)

    return build


def _local(cls: str, **kwargs) -> Callable[[], nn.Module]:
    return _imported(f"zoo.nets:{cls}", **kwargs)  # a class of zoo/nets.py, importable from benchmarks/


def _imported(spec: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
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
    return structprune.models.create(f"timm:{name}", num_classes=10, **kwargs)  # the registry, by name
