"""BERT heads and FFN neurons: a tiny randomly initialised BertModel (built from a config, no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import structprune
from conftest import BERT_VOCAB, BERT_WORDS, prune_keeping_everything, tiny_bert
from structprune import attention, capture, cli
from structprune.graph import build_graph
from structprune.measure import count

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make install`

WORDS, VOCAB = BERT_WORDS, BERT_VOCAB
METHODS = ["ispasp", "pfp", "magnitude", "random"]


def sentences(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(6, 14, (1,), generator=gen)),),
                                                     generator=gen)) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


@pytest.fixture(scope="module")
def batches(tokenizer):
    return [dict(tokenizer(sentences(24, seed), padding=True, return_tensors="pt")) for seed in range(2)]


def hidden(model, batch):
    return model(**batch).last_hidden_state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget, heads, inter", [({"*.attention": 0.5}, 2, 64), ({"*.intermediate": 0.25}, 4, 16),
                                                   (0.5, 2, 32)])
def test_prunes_heads_and_ffn_with_each_method(method, budget, heads, inter, batches):
    model = tiny_bert()
    result = structprune.prune(model, batches, method, budget, progress=False)
    pruned = result.model
    for layer in pruned.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == heads and attn.all_head_size == heads * attn.attention_head_size
        assert attn.query.out_features == attn.key.out_features == attn.value.out_features == heads * 8
        assert layer.attention.output.dense.in_features == heads * 8
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == inter
    assert pruned.config.structprune_layers == {
        **{f"encoder.layer.{i}.attention": {"heads": heads, "kv_heads": heads, "head_dim": 8} for i in range(2)},
        **{f"encoder.layer.{i}.intermediate": {"neurons": inter} for i in range(2)}}
    with torch.no_grad():
        out = hidden(pruned, batches[0])
    assert out.shape == hidden(model, batches[0]).shape and torch.isfinite(out).all()
    assert result.after["params"] < result.before["params"]
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4  # the input model is untouched


def test_keep_ratio_one_reproduces_the_dense_outputs(batches):
    model = tiny_bert()
    result = structprune.prune(model, batches, "ispasp", 1.0, progress=False)
    with torch.no_grad():
        assert torch.equal(hidden(result.model, batches[1]), hidden(model, batches[1]))
    # every stage taken with every head and neuron kept (prune() leaves whole groups alone): the same function
    kept_all = prune_keeping_everything(model, batches, "ispasp")
    with torch.no_grad():
        assert torch.allclose(hidden(kept_all, batches[1]), hidden(model, batches[1]), rtol=1e-5, atol=1e-5)


def test_after_group_runs_after_each_group_with_that_group_already_pruned(batches):
    """Issue 35's bug: the callback (what the sequential schedule fine-tunes with) on a Hugging Face model."""
    seen = []

    def after(model, name):
        module = model.get_submodule(name)
        width = (module.self.num_attention_heads if name.endswith("attention") else module.dense.out_features)
        seen.append((name, width))

    model = tiny_bert()
    result = structprune.prune(model, batches, "ispasp", 0.5, after_group=after, progress=False)
    assert seen == [("encoder.layer.0.attention", 2), ("encoder.layer.0.intermediate", 32),
                    ("encoder.layer.1.attention", 2), ("encoder.layer.1.intermediate", 32)]
    plain = structprune.prune(model, batches, "ispasp", 0.5, progress=False)  # a callback that changes nothing
    with torch.no_grad():
        assert torch.equal(hidden(result.model, batches[1]), hidden(plain.model, batches[1]))


def test_head_selection_keeps_the_heads_that_carry_the_output(batches):
    """Zero the value rows of heads 0 and 2 in every layer: data-informed methods must drop exactly those."""
    model = tiny_bert(seed=3)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for head in (0, 2):
                layer.attention.self.value.weight[head * 8:(head + 1) * 8] = 0
                layer.attention.self.value.bias[head * 8:(head + 1) * 8] = 0
    for method in ("ispasp", "pfp"):
        options = {"proxy": "contribution"} if method == "ispasp" else {}
        result = structprune.prune(model, batches, method, {"*.attention": 0.5}, progress=False, **options)
        assert all(entry["relative_residual"] < 1e-5 for entry in result.layers if entry["kept"] < entry["channels"])


def test_padding_tokens_are_not_calibration_rows(tokenizer):
    model = tiny_bert()
    batch = dict(tokenizer(["the cat sat", "the big red dog ran very fast on the old mat"], padding=True,
                           return_tensors="pt"))
    graph = build_graph(model, batch)
    ffn = [g for g in graph.groups() if g.name.endswith("intermediate")][0]
    view = capture.capture(model, ffn, [batch])
    assert view.consumers[0].inputs.shape[0] == int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()


def test_macs_include_the_attention_products_of_the_kept_heads(batches):
    """Q·Kᵀ and A·V (2·L²·heads·head_size per layer) are added to Torch-Pruning's count of the layers."""
    import torch_pruning as tp

    model = tiny_bert()
    example = {k: v[:1] for k, v in batches[0].items()}
    result = structprune.prune(model, batches, "magnitude", {"*.attention": 0.5}, example, progress=False)
    tokens = example["input_ids"].shape[1]
    for net, heads in ((model, 4), (result.model, 2)):
        layers_only, _ = tp.utils.count_ops_and_params(net, example)
        assert count(net, example)["macs"] - layers_only == 2 * (2 * tokens**2 * heads * 8)


def test_target_params_on_bert(batches):
    model = tiny_bert(hidden=64, heads=8, inter=256)
    result = structprune.prune(model, batches, "ispasp", structprune.Target(0.6, "params", tolerance=0.02),
                               progress=False)
    assert result.budget["relative_error"] <= 0.02
    assert abs(result.after["params"] / result.before["params"] - 0.6) <= 0.6 * 0.02


def test_save_and_reload_in_a_fresh_process(batches, tmp_path):
    model = tiny_bert()
    result = structprune.prune(model, batches, "pfp", {"encoder.layer.0.*": 0.5, "*.intermediate": 0.25},
                               progress=False)
    out = structprune.save(result, tmp_path / "pruned")
    assert (out / "config.json").is_file()
    torch.save({"batch": batches[1], "expected": hidden(result.model, batches[1]).detach()}, tmp_path / "io.pt")
    script = (f"import json, torch, structprune; d = torch.load({str(tmp_path / 'io.pt')!r}); "
              f"m = structprune.load({str(out)!r}); "
              f"assert torch.equal(m(**d['batch']).last_hidden_state, d['expected']); "
              f"print(json.dumps(m.config.structprune_layers))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    sizes = json.loads(run.stdout)
    assert sizes["encoder.layer.0.attention"] == {"heads": 2, "kv_heads": 2, "head_dim": 8}
    assert sizes["encoder.layer.1.attention"]["heads"] == 4 and sizes["encoder.layer.1.intermediate"]["neurons"] == 16
    with pytest.raises(structprune.StructPruneError, match="already exists"):
        structprune.save(result, out)


def test_ffn_only_uniform_pruning_loads_with_from_pretrained(batches, tmp_path):
    result = structprune.prune(tiny_bert(), batches, "ispasp", {"*.intermediate": 0.5}, progress=False)
    structprune.save(result, tmp_path / "ffn")
    reloaded = transformers.BertModel.from_pretrained(tmp_path / "ffn").eval()
    with torch.no_grad():
        assert torch.equal(hidden(reloaded, batches[0]), hidden(result.model, batches[0]))


def test_corrupted_weights_are_a_clear_error(batches, tmp_path):
    result = structprune.prune(tiny_bert(), batches, "magnitude", 0.5, progress=False)
    out = structprune.save(result, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(structprune.StructPruneError, match="not readable"):
        structprune.load(out)


def test_a_model_without_encoder_layers_is_not_taken_for_bert():
    assert not attention.is_supported(structprune.models.create("lenet300"))
    with pytest.raises(structprune.StructPruneError, match="parts"):
        attention.TransformerGraph(tiny_bert(), parts=("mlp",))


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture()
def hf_dir(tmp_path, tokenizer):
    path = tmp_path / "bert"
    tiny_bert().save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(sentences(60, seed=5)) + "\n")
    return path, text


def test_cli_prunes_heads_of_a_local_model(hf_dir, tmp_path, capsys):
    path, text = hf_dir
    out = tmp_path / "out"
    code = cli.main(["prune", "--hf-model", str(path), "--text", str(text), "--prune", "heads", "--ratio", "0.5",
                     "--method", "ispasp", "--max-length", "16", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["layer_sizes"] == {
        **{f"encoder.layer.{i}.attention": {"heads": 2, "kv_heads": 2, "head_dim": 8} for i in range(2)},
        **{f"encoder.layer.{i}.intermediate": {"neurons": 64} for i in range(2)}}
    assert report["held_out_sentences"] == 12 and 0 < report["embedding_cosine_similarity"] <= 1
    assert "cosine similarity" in capsys.readouterr().out
    model = structprune.load(out)
    assert model.encoder.layer[1].attention.self.num_attention_heads == 2
    assert (out / "tokenizer_config.json").is_file() and (out / "structprune.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--prune", "mlp"], "heads, ffn"),
    (["--finetune-epochs", "1"], "not available with --hf-model"),
    (["ckpt.pt"], "either a checkpoint, --model SPEC or --hf-model"),
])
def test_cli_hf_errors(hf_dir, tmp_path, capsys, argv, message):
    path, text = hf_dir
    with pytest.raises(SystemExit) if argv[0] == "--prune" else _no_raise():
        code = cli.main(["prune", "--hf-model", str(path), "--text", str(text), "--out", str(tmp_path / "o"), *argv])
        assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_hf_model_must_be_a_model_directory(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("\n".join(sentences(20)))
    code = cli.main(["prune", "--hf-model", str(tmp_path), "--text", str(tmp_path / "text.txt"), "--out",
                     str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path} is not a Hugging Face model directory (no config.json)" in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
