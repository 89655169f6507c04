"""Every transformers family structprune describes (models/hf.py), built tiny from its config: heads are pruned
whole (whole key/value groups under grouped-query attention), the head counts follow, the pruned model computes
what the dense one computes on the kept heads and neurons, and it reloads in a fresh process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import structprune
from conftest import FAMILY_MODELS, HEADS, INNER, WIDTH, build_family, family_config, family_inputs
from structprune import attention
from structprune.attention import TransformerGraph, find_blocks, layer_sizes
from structprune.layers import weight_matrix

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make install`

FAMILIES = list(FAMILY_MODELS)
build, inputs, _config = build_family, family_inputs, family_config


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_every_family_has_its_blocks_described():
    for family in FAMILIES:
        heads, ffns = find_blocks(build(family))
        layers = 1 if family == "albert" else 2  # ALBERT shares one layer between its two
        # BART: an encoder and a decoder layer, the decoder's with self- and cross-attention
        assert (len(heads), len(ffns)) == ((3, 2) if family == "bart" else (layers, layers)), family
        assert all(b.heads == HEADS and b.head_dim == WIDTH // HEADS for b in heads), family
        assert {b.kv_heads for b in heads} == {2 if family == "llama" else HEADS}, family


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_the_dense_model_on_the_kept_heads_and_neurons(family):
    """Dropping heads (neurons) physically gives what the dense model gives with their output columns zeroed."""
    model = build(family)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    graph, reference = TransformerGraph(pruned), TransformerGraph(masked)
    for group, twin in zip(graph.all_groups(), reference.all_groups(), strict=True):
        keep = torch.arange(1, group.channels, 2)  # every other head / key-value group / neuron
        dropped = torch.ones(group.channels, dtype=torch.bool)
        dropped[keep] = False
        with torch.no_grad():
            for consumer in twin.consumers:
                weight_matrix(consumer.module)[:, consumer.channel_index[dropped].reshape(-1)] = 0
        graph.apply(group, keep)
    batch = inputs(family)
    assert torch.allclose(hidden(pruned, batch), hidden(masked, batch), atol=1e-5)
    assert hidden(pruned, batch).shape == hidden(model, batch).shape


def _check_heads_whole(model) -> None:
    for block in find_blocks(model)[0]:
        d, layout, module = block.head_dim, block.layout, block.module
        out = block.layer(layout.output)
        width = weight_matrix(out).shape[1]
        if layout.fused:
            assert weight_matrix(block.layer(layout.fused)).shape[0] == 3 * width
        else:
            q, k, v = (weight_matrix(block.layer(p)).shape[0] for p in (layout.query, layout.key, layout.value))
            assert q == width and k == v and k % d == 0 and (q // d) % (k // d) == 0
        assert width % d == 0
        for attr in layout.heads:  # the head counts the module keeps agree with its weights
            value = attention.attribute(module, attr)
            assert value is None or value == width // d, (block.name, attr)
        for attr in layout.widths:
            assert attention.attribute(module, attr) in (None, width), (block.name, attr)


@pytest.fixture(scope="module")
def pruned_models(tmp_path_factory):
    """Each family pruned to half its heads and neurons by the default i-SpaSP pipeline, saved."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        calib = [inputs(family, 8, seed) for seed in range(2)]
        result = structprune.prune(build(family), calib, "ispasp", 0.5, progress=False)
        path = structprune.save(result, root / family)
        batch = inputs(family, 3, seed=9)
        torch.save({"batch": batch, "expected": hidden(result.model, batch)}, root / f"{family}.io.pt")
        out[family] = (result, path)
    return root, out


@pytest.mark.parametrize("family", FAMILIES)
def test_default_pipeline_prunes_whole_heads_with_the_config_in_step(family, pruned_models):
    result, path = pruned_models[1][family]
    model = result.model
    _check_heads_whole(model)
    sizes = layer_sizes(model)
    assert model.config.structprune_layers == sizes
    assert {s["heads"] for s in sizes.values() if "heads" in s} == {HEADS // 2}
    assert {s["neurons"] for s in sizes.values() if "neurons" in s} == {INNER // 2}
    assert result.after["params"] < result.before["params"] and result.after["macs"] < result.before["macs"]
    saved = json.loads((path / "config.json").read_text())
    assert saved["structprune_layers"] == sizes


def test_grouped_query_attention_loses_whole_key_value_groups(pruned_models):
    model = pruned_models[1]["llama"][0].model
    for layer in model.layers:
        attn = layer.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == attn.head_dim  # 1 of 2 key/value heads
        assert attn.q_proj.out_features == 2 * attn.head_dim  # and both query heads that share it
        assert attn.num_key_value_groups == 2
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_every_family_reloads_in_a_fresh_process(pruned_models):
    root, _ = pruned_models
    script = (
        "import sys, torch, structprune\n"
        f"root = {str(root)!r}\n"
        f"for family in {FAMILIES!r}:\n"
        "    d = torch.load(f'{root}/{family}.io.pt')\n"
        "    model = structprune.load(f'{root}/{family}')\n"
        "    with torch.no_grad():\n"
        "        diff = (model(**d['batch']).last_hidden_state - d['expected']).abs().max().item()\n"
        "    print(family, diff)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    diffs = dict(line.split() for line in run.stdout.splitlines())
    assert sorted(diffs) == sorted(FAMILIES)
    assert all(float(diff) <= 1e-5 for diff in diffs.values()), diffs


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_transformers_own_from_pretrained_loads_uniformly_pruned_heads(family, pruned_models):
    """Where the config has a head size (Llama, ViT), uniform pruning is written into its own fields."""
    result, path = pruned_models[1][family]
    reloaded = getattr(transformers, FAMILY_MODELS[family]).from_pretrained(path).eval()
    batch = inputs(family, 2, seed=4)
    assert torch.allclose(hidden(reloaded, batch), hidden(result.model, batch), atol=1e-5)


def test_a_directory_in_transformers_older_weight_names_loads(tmp_path):
    """transformers 5 writes ViT in its older layout by default (encoder.layer.N.attention.attention.query)."""
    model = build("vit")
    model.save_pretrained(tmp_path / "vit")
    batch = inputs("vit", 2)
    assert torch.equal(hidden(structprune.load(tmp_path / "vit"), batch), hidden(model, batch))


def test_cli_prunes_a_gpt2_directory_whose_tokenizer_has_no_pad_token(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from structprune import cli

    words = "the a cat dog sat on mat ran fast slow big small red blue and or was is very old".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    assert tokenizer.pad_token is None
    model = build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=gen)) for _ in range(40)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    code = cli.main(["prune", "--hf-model", str(tmp_path / "gpt2"), "--text", str(tmp_path / "text.txt"),
                     "--method", "pfp", "--ratio", "0.5", "--max-length", "12", "--out", str(tmp_path / "out"),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["layer_sizes"]["h.0.attn"] == {"heads": 2, "kv_heads": 2, "head_dim": 8}
    assert report["layer_sizes"]["h.1.mlp"] == {"neurons": INNER // 2}
    assert 0 < report["embedding_cosine_similarity"] <= 1
    reloaded = structprune.load(tmp_path / "out")
    assert reloaded.h[0].attn.split_size == 16 and reloaded.h[0].attn.c_attn.nf == 48


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_attention_products_and_transposed_layers_count_per_sample_like_the_layers(family):
    import torch_pruning as tp

    from structprune.measure import count

    model = build(family)
    batch = next(iter(inputs(family, n=3).values()))  # one positional tensor: the counter divides by its length

    def beyond_torch_prunings_counter(x) -> int:  # its own count moves a little with the batch on ViT
        return count(model, x)["macs"] - int(tp.utils.count_ops_and_params(model, x)[0])

    extra = beyond_torch_prunings_counter(batch[:1])
    assert extra > 0 and beyond_torch_prunings_counter(batch) == extra  # before: the batch's products
