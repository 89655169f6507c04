"""Depth pruning (issue 35): block influence against the hidden states transformers returns, removal against a
model of that depth built by transformers itself, reloading, generation with a key/value cache, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import structprune
from conftest import BERT_VOCAB, text_model_dir, tiny_bert
from structprune import depth
from structprune.cli import main

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make install`


def _llama(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()


def _batches(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(BERT_VOCAB), (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output_over_real_tokens():
    model = tiny_bert(layers=3)
    batch = _batches()[0]
    ours = depth.block_influence(model, [batch], progress=False)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    real = batch["attention_mask"].bool()
    reference = [1 - float(torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)[real].mean())
                 for i in range(3)]
    assert ours == pytest.approx(reference, abs=1e-6)


def test_choose_drops_the_least_influential_the_last_or_random_layers():
    assert depth.choose(5, 3, "influence", [0.3, 0.1, 0.5, 0.05, 0.2]) == [1, 3]
    assert depth.choose(5, 3, "last") == [3, 4]
    drop = depth.choose(5, 2, "random", seed=1)
    assert len(drop) == 3 and drop == sorted(set(drop)) and drop == depth.choose(5, 2, "random", seed=1)
    for bad in (0, 6):
        with pytest.raises(structprune.StructPruneError, match="keep must be between 1 and the 5 layers"):
            depth.choose(5, bad, "last")


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_the_loss_criterion_drops_greedily_what_leaves_the_least_measured_loss(kind):
    """Each round's choice against the model with those layers really removed (drop_layers on a copy): a causal
    LM's log perplexity, an encoder's 1 − cosine of its sentence embeddings to the dense model's."""
    model = _llama(layers=4) if kind == "causal" else tiny_bert(layers=4)
    batches = _batches()
    dense = None if kind == "causal" else structprune.measure.sentence_embeddings(model, batches)

    def measured(drop):
        pruned = copy.deepcopy(model)
        depth.drop_layers(pruned, drop)
        if kind == "causal":
            return math.log(structprune.measure.perplexity(pruned, batches))
        return 1 - structprune.measure.embedding_similarity(dense, structprune.measure.sentence_embeddings(pruned,
                                                                                                            batches))
    alone = [measured([i]) for i in range(4)]
    first = min(range(4), key=lambda i: alone[i])
    second = min((i for i in range(4) if i != first), key=lambda i: measured(sorted([first, i])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = depth.prune_depth(model, batches, 2, criterion="loss", progress=False)
    assert result.losses == pytest.approx(alone, abs=1e-5)
    assert result.dropped == sorted([first, second]) and result.kept == [i for i in range(4) if i not in result.dropped]
    assert result.to_dict()["losses"] == result.losses and result.model.config.num_hidden_layers == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(layer._forward_hooks for layer in depth.layer_stack(model)[1])  # the skipping hooks are gone


def _fresh_without(model, drop: list[int]):
    """The same model at the smaller depth built by transformers itself, loaded with the kept layers' weights."""
    layers = model.config.num_hidden_layers
    kept = [i for i in range(layers) if i not in drop]
    config = model.config.to_dict()
    config.pop("structprune_layers", None)
    fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "num_hidden_layers": len(kept)}))
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) in kept:
                state[f"model.layers.{kept.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    fresh.load_state_dict(state)
    return fresh.eval()


def test_dropped_layers_give_the_model_transformers_builds_at_that_depth(tmp_path):
    model = _llama()
    result = depth.prune_depth(model, _batches(), 2, progress=False)
    assert len(result.dropped) == 2 and result.kept == [i for i in range(4) if i not in result.dropped]
    assert result.dropped == sorted(sorted(range(4), key=lambda i: result.influence[i])[:2])
    pruned = result.model
    assert pruned.config.num_hidden_layers == 2 and len(model.model.layers) == 4  # the input is untouched
    reference = _fresh_without(model, result.dropped)
    batch = _batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(pruned(**batch).logits, reference(**batch).logits, atol=1e-6)
    prompt = batch["input_ids"][:1, :5]  # generation with the key/value cache indexes the layers anew
    assert torch.equal(pruned.generate(prompt, max_new_tokens=6, do_sample=False),
                       reference.generate(prompt, max_new_tokens=6, do_sample=False))
    structprune.models.hf.save_pretrained(pruned, tmp_path / "shallow")
    for loaded in (transformers.LlamaForCausalLM.from_pretrained(tmp_path / "shallow"),
                   structprune.load(tmp_path / "shallow")):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**batch).logits, pruned(**batch).logits)


def test_depth_after_width_renames_the_recorded_sizes(tmp_path):
    model = structprune.prune(_llama(), _batches(), "ispasp", {"model.layers.3.mlp": 0.5}, progress=False).model
    pruned = depth.prune_depth(model, _batches(), 3, criterion="last", progress=False).model  # layer 3 goes
    assert pruned.model.layers[2].mlp.gate_proj.out_features == 64
    depth.drop_layers(model, [0])  # in place: the half-width layer 3 is now layer 2
    sizes = model.config.structprune_layers
    assert set(sizes) == {f"model.layers.{i}.{part}" for i in range(3) for part in ("self_attn", "mlp")}
    assert sizes["model.layers.2.mlp"] == {"neurons": 32} and sizes["model.layers.1.mlp"] == {"neurons": 64}
    structprune.models.hf.save_pretrained(model, tmp_path / "d")
    loaded = structprune.load(tmp_path / "d").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_batches(1)[0]).logits, model(**_batches(1)[0]).logits)


def test_models_whose_layers_cannot_go_one_by_one_are_refused():
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=len(BERT_VOCAB), embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64))
    with pytest.raises(structprune.StructPruneError, match="shared layers"):
        depth.prune_depth(albert, _batches(), 2, criterion="last", progress=False)
    bart = transformers.BartModel(transformers.BartConfig(
        vocab_size=len(BERT_VOCAB), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.raises(structprune.StructPruneError, match="2 stacks of layers"):
        depth.prune_depth(bart, _batches(), 1, criterion="last", progress=False)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return text_model_dir(tmp_path_factory.mktemp("depth"), "llama", _llama())


def test_cli_prunes_layers_then_heads_and_ffn_of_the_rest(llama_dir, tmp_path, capsys):
    argv = ["prune", "--hf-model", str(llama_dir / "llama"), "--text", str(llama_dir / "text.txt"),
            "--max-length", "16", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--prune", "layers", "--layers-keep", "0.75", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["depth"]["layers_after"] == 3 and len(report["depth"]["influence"]) == 4
    assert report["metric"] == "perplexity" and report["params_ratio"] < 1
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a").config.num_hidden_layers == 3
    assert main([*argv, "--prune", "layers,ffn", "--layers-keep", "2", "--ratio", "0.5",
                 "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    loaded = structprune.load(tmp_path / "b")
    assert len(loaded.model.layers) == 2 and loaded.model.layers[1].mlp.gate_proj.out_features == 32
    assert report["before"]["params"] == sum(p.numel() for p in _llama().parameters())
    assert "layers 4 -> 2" in capsys.readouterr().out
    assert main([*argv, "--prune", "ffn", "--layers-keep", "2", "--out", str(tmp_path / "c")]) == 2
    assert "--layers-keep goes with --prune layers" in capsys.readouterr().err
    assert main([*argv, "--prune", "layers", "--out", str(tmp_path / "c")]) == 2
    assert "--prune layers needs --layers-keep N" in capsys.readouterr().err
    assert main([*argv, "--prune", "ffn", "--layers-criterion", "loss", "--out", str(tmp_path / "c")]) == 2
    assert "--layers-criterion goes with --prune layers" in capsys.readouterr().err
    assert main([*argv, "--prune", "layers", "--layers-keep", "3", "--layers-criterion", "loss",
                 "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    losses = report["depth"]["losses"]
    assert report["depth"]["criterion"] == "loss" and report["method"] == "measured loss"
    assert report["depth"]["dropped"] == [min(range(4), key=lambda i: losses[i])]  # one layer: the first round's
    assert "layers 4 -> 3" in capsys.readouterr().out


def test_cli_prunes_and_evaluates_in_bfloat16(llama_dir, tmp_path, capsys):
    """--dtype: the model is loaded, pruned, judged and saved in bfloat16; its perplexity is float32's within the
    rounding of bfloat16 (a few per cent on this random model)."""
    from safetensors import safe_open

    argv = ["prune", "--hf-model", str(llama_dir / "llama"), "--text", str(llama_dir / "text.txt"),
            "--prune", "ffn", "--ratio", "0.5", "--max-length", "16", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "f32")]) == 0
    assert main([*argv, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0, capsys.readouterr().err
    f32, bf16 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("f32", "bf16"))
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert bf16["peak_rss_bytes"] > 0
    assert bf16["perplexity"] == pytest.approx(f32["perplexity"], rel=0.05)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert structprune.load(tmp_path / "bf16").model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    code = main(["eval", str(tmp_path / "bf16"), "--text", str(llama_dir / "text.txt"), "--dtype", "float32",
                 "--seq-len", "16", "--no-progress", "--json", str(tmp_path / "e.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["rows"][0]["perplexity"] > 1
