"""Removing channels keeps the function: on every zoo model (ResNet residual streams, MobileNetV2's depthwise
convolutions, VGG, LeNet-5's conv → flatten → Linear) and every transformers family structprune describes, the bare
one-shot prune at a keep ratio of 0.5 computes what the dense model computes with the removed channels' columns
zeroed in every layer that reads them; and the default pipeline (refit, BatchNorm recalibration) is closer to the
dense model on held-out inputs than the bare step: on the trained Fashion-MNIST checkpoints (a random CNN's function
at half of every group is chaos either way) and on the transformer families."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import structprune
from conftest import FAMILY_MODELS, ZOO, build_family, calibration, family_inputs, make_zoo_model
from structprune import data
from structprune.attention import TransformerGraph
from structprune.graph import PruningGraph, build_graph
from structprune.layers import weight_matrix
from structprune.recalibrate import recalibrate_batchnorm


def _recorded_removals(monkeypatch) -> dict:
    """Group name -> the channels each removal keeps (both graphs), as prune applies them."""
    kept: dict = {}
    for graph_class in (PruningGraph, TransformerGraph):
        def apply(self, group, keep_idx, *args, _real=graph_class.apply, **kwargs):
            kept[group.name] = torch.as_tensor(keep_idx).clone()
            return _real(self, group, keep_idx, *args, **kwargs)

        monkeypatch.setattr(graph_class, "apply", apply)
    return kept


def _zeroed(model, example, kept: dict):
    """The dense model with every removed channel's input columns zeroed in the layers that read it."""
    masked = copy.deepcopy(model)
    groups = {g.name: g for g in build_graph(masked, example).all_groups()}
    assert set(kept) <= set(groups)
    with torch.no_grad():
        for name, keep_idx in kept.items():
            group = groups[name]
            dropped = torch.ones(group.channels, dtype=torch.bool)
            dropped[keep_idx] = False
            for consumer in group.consumers:
                assert not consumer.grouped  # its columns would need the dense form
                columns = consumer.channel_index[dropped].reshape(-1)
                weight = weight_matrix(consumer.module) if consumer.kind == "linear" else consumer.module.weight
                weight[:, columns] = 0
    return masked


def _relative_error(out, dense) -> float:
    return float((out - dense).norm() / dense.norm())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_zoo_cnn_pruned_bare_is_the_dense_model_with_the_removed_channels_zeroed(name, monkeypatch):
    model, shape = make_zoo_model(name)
    calib = calibration(shape, samples=512, batch=64)
    recalibrate_batchnorm(model, calib)  # statistics of the data, as a trained model's are
    held_out = torch.randn(64, *shape, generator=torch.Generator().manual_seed(7))
    kept = _recorded_removals(monkeypatch)
    bare = structprune.prune(model, calib, "ispasp", 0.5, refit=False, recalibrate=False, progress=False)
    assert kept and all(len(k) < g["channels"] for k, g in zip(kept.values(), bare.layers, strict=False))
    with torch.no_grad():
        dense, pruned = model(held_out), bare.model(held_out)
        masked = _zeroed(model, held_out[:1], kept)(held_out)
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned, dense, atol=1e-3)  # (the check above is not vacuous)


CHECKPOINTS = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints"


@pytest.fixture(scope="module")
def fashion_mnist():
    """256 training images to calibrate on, 256 test images held out (Debian's files, as `make install` puts)."""
    train, test = data.load("fashion-mnist", "train", limit=256), data.load("fashion-mnist", "test", limit=256)
    return [(train.tensors[0][i:i + 128], train.tensors[1][i:i + 128]) for i in (0, 128)], test.tensors[0]


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet20", "vgg16"])
def test_the_default_pipeline_is_closer_to_a_trained_model_than_the_bare_step(name, fashion_mnist):
    calib, held_out = fashion_mnist
    model = structprune.load(CHECKPOINTS / f"{name}-fmnist.pt")
    with torch.no_grad():
        dense = model(held_out)
        errors = [_relative_error(structprune.prune(model, calib, "ispasp", 0.5, progress=False, **options)
                                  .model(held_out), dense) for options in ({"refit": False, "recalibrate": False}, {})]
    assert errors[1] < errors[0]


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_a_transformer_pruned_bare_is_the_dense_model_with_the_removed_heads_and_neurons_zeroed(family, monkeypatch):
    model = build_family(family)
    calib = [family_inputs(family, n=16, seed=seed) for seed in range(4)]
    held_out = family_inputs(family, n=8, seed=99)
    kept = _recorded_removals(monkeypatch)
    bare = structprune.prune(model, calib, "ispasp", 0.5, refit=False, recalibrate=False, progress=False)
    assert len(kept) == len(bare.layers) >= 2
    dense, pruned = _hidden(model, held_out), _hidden(bare.model, held_out)
    masked = _hidden(_zeroed(model, held_out, kept), held_out)
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned, dense, atol=1e-3)
    default = structprune.prune(model, calib, "ispasp", 0.5, progress=False)
    assert _relative_error(_hidden(default.model, held_out), dense) < _relative_error(pruned, dense)
