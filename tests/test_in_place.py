"""Pruning in place and loading a Hugging Face directory one tensor at a time (issue 35, item 4: a model held once,
not twice): the same pruned model as with a copy, what cannot be done in place refused, and the checkpoint's
weights copied exactly, a bad one named in one line."""

from __future__ import annotations

import pytest
import torch

import structprune
from conftest import calibration
from structprune.models import hf

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)
BUDGET = {"*.self_attn": 0.5, "*.mlp": 0.5}


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def _batches():
    ids = torch.randint(1, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids}]


def test_in_place_prunes_the_callers_model_to_what_the_copy_gives():
    calib = _batches()
    copied = structprune.prune(_llama(), calib, "ispasp", BUDGET, progress=False)
    model = _llama()
    result = structprune.prune(model, calib, "ispasp", BUDGET, progress=False, in_place=True)
    assert result.model is model  # no copy: the caller's model is the pruned one
    assert result.reconstruct == copied.reconstruct == "layer"
    assert result.after == copied.after and result.after["params"] < result.before["params"]
    assert model.state_dict().keys() == copied.model.state_dict().keys()
    for name, value in copied.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_in_place_refits_each_layer_to_its_own_output_and_refuses_what_needs_the_original(tiny_mlp):
    """A chain of layers refits to the original model's outputs by default; in place no original is left, so the
    layer's own output on the pruned inputs is the target (the same as asking for it with a copy)."""
    calib = calibration((1, 4, 4))
    default = structprune.prune(tiny_mlp, calib, "ispasp", 0.5, progress=False)
    layer = structprune.prune(tiny_mlp, calib, "ispasp", 0.5, reconstruct="layer", progress=False)
    dense = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    result = structprune.prune(tiny_mlp, calib, "ispasp", 0.5, in_place=True, progress=False)
    assert default.reconstruct == "original" and result.reconstruct == "layer"
    for name, value in layer.model.state_dict().items():
        torch.testing.assert_close(tiny_mlp.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert tiny_mlp.state_dict()["1.weight"].shape != dense["1.weight"].shape
    with pytest.raises(structprune.StructPruneError, match='reconstruct="original" needs a copy'):
        structprune.prune(tiny_mlp, calib, "ispasp", 0.5, reconstruct="original", in_place=True, progress=False)
    with pytest.raises(structprune.StructPruneError, match="fresh copy"):
        structprune.prune(tiny_mlp, calib, "ispasp", structprune.Target(0.5, allocation="error"), in_place=True,
                          progress=False)


def test_load_pretrained_copies_every_weight_and_names_a_misfit_one(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "m")
    loaded = hf.load_pretrained(tmp_path / "m")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    as_bf16 = hf.load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(as_bf16.state_dict()["lm_head.weight"], model.lm_head.weight.bfloat16(), rtol=0, atol=0)
    config = (tmp_path / "m" / "config.json").read_text().replace('"intermediate_size": 64', '"intermediate_size": 48')
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.raises(structprune.StructPruneError, match=r"do not fit the model: model\.layers\.0\.mlp\.\w+_proj"
                                                           r"\.weight is \[\d+, \d+\] in the checkpoint"):
        hf.load_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(structprune.StructPruneError, match="not readable"):
        hf.load_pretrained(tmp_path / "m")
