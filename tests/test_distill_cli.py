"""``structprune distill`` and the distillation stage of prune and compare: the teacher found from what the pruned
model records, label-free data, reports, and each mistake as one line naming the fix."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import structprune
from structprune.cli import main
from structprune.data import source

SMALL = ["--data", "synthetic", "--limit", "256", "--no-progress"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A LeNet-5 trained briefly on the synthetic data, and its half-width pruning (the checkpoint records it)."""
    root = tmp_path_factory.mktemp("distill")
    assert main(["train", "--model", "lenet5", "--epochs", "1", *SMALL, "--out", str(root / "dense.pt")]) == 0
    assert main(["prune", str(root / "dense.pt"), "--ratio", "0.5", "--data", "synthetic", "--limit", "128",
                 "--no-progress", "--out", str(root / "pruned.pt")]) == 0
    return root


def test_distill_finds_the_teacher_the_pruned_checkpoint_records(pruned, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recorded path is absolute: it is found from anywhere
    out = tmp_path / "distilled.pt"
    code = main(["distill", str(pruned / "pruned.pt"), *SMALL, "--eval-limit", "100", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["teacher"] == {"checkpoint": str((pruned / "dense.pt").resolve())}
    assert report["loss"] == "kl" and report["steps"] == 2 and report["train_samples"] == 256
    assert report["metric"] == "accuracy" and report["held_out_samples"] == 100
    assert {"accuracy_before", "accuracy_after", "teacher_accuracy"} <= set(report)
    assert "distilled 2 steps (kl loss): accuracy" in capsys.readouterr().out
    before, after = structprune.load(pruned / "pruned.pt"), structprune.load(out)
    assert [p.shape for p in before.parameters()] == [p.shape for p in after.parameters()]  # still the pruned size
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
    # the distilled checkpoint records the same teacher: distilling it again needs no --teacher either
    assert main(["distill", str(out), *SMALL, "--steps", "1", "--out", str(tmp_path / "again.pt")]) == 0


def test_a_model_that_records_no_pruning_needs_teacher(pruned, tmp_path, capsys):
    code = main(["distill", str(pruned / "dense.pt"), *SMALL, "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "records no model it was pruned from" in err and "--teacher" in err


def test_a_recorded_teacher_that_is_gone_names_teacher(pruned, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(pruned, root)
    assert main(["prune", str(root / "dense.pt"), "--ratio", "0.5", *SMALL, "--no-eval", "--out",
                 str(root / "p.pt")]) == 0
    (root / "dense.pt").unlink()
    code = main(["distill", str(root / "p.pt"), *SMALL, "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "which is not there any more" in err and "--teacher" in err


def test_a_teacher_with_other_outputs_is_refused(pruned, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "three.npz", x=torch.randn(64, 1, 16, 16, generator=gen).numpy(),
             y=torch.randint(0, 3, (64,), generator=gen).numpy())
    assert main(["train", "--model", "lenet5", "--epochs", "1", "--data", str(tmp_path / "three.npz"),
                 "--no-progress", "--out", str(tmp_path / "other.pt")]) == 0
    code = main(["distill", str(pruned / "pruned.pt"), "--teacher", str(tmp_path / "other.pt"), *SMALL,
                 "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "but the teacher (1, 3)" in err


@pytest.mark.parametrize("argv, message", [
    (["--text", "t.txt"], "--text goes with a Hugging Face model directory"),
    (["--epochs", "1", "--steps", "2"], "not allowed with argument"),
    (["--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["--loss", "l1"], "invalid choice"),
])
def test_options_that_do_not_apply_are_one_line(pruned, tmp_path, capsys, argv, message):
    try:
        code = main(["distill", str(pruned / "pruned.pt"), *SMALL, *argv, "--out", str(tmp_path / "o.pt")])
    except SystemExit as exc:  # argparse's own errors (one line: structprune.cli.Parser)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_unlabelled_tensors_train_and_are_judged_by_agreement(pruned, tmp_path, capsys):
    x = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)).numpy()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "d.pt"
    code = main(["distill", str(pruned / "pruned.pt"), "--data", str(tmp_path / "x.npy"), "--no-progress",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["metric"] == "agreement" and report["train_samples"] == 160 and report["held_out_samples"] == 40
    assert "top-1 agreement with the teacher" in capsys.readouterr().out
    code = main(["distill", str(pruned / "pruned.pt"), "--data", str(tmp_path / "x.npy"), "--alpha", "0.5",
                 "--no-progress", "--out", str(tmp_path / "e.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "the batches have none" in err


def test_an_image_folder_without_class_folders_is_unlabelled(tmp_path):
    from PIL import Image

    for i in range(10):
        Image.fromarray(np.full((12, 12, 3), 20 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    found = source(f"imagefolder:{tmp_path}")
    assert found.classes is None and found.shape == (3, 12, 12)
    sample = found.load("train")[0]
    assert isinstance(sample, torch.Tensor) and sample.shape == (3, 12, 12)
    assert len(found.load("train")) + len(found.load("test")) == 10


def test_prune_distills_as_its_last_stage(pruned, tmp_path, capsys):
    out = tmp_path / "p.pt"
    code = main(["prune", str(pruned / "dense.pt"), "--ratio", "0.5", *SMALL, "--train-limit", "128",
                 "--distill-steps", "3", "--distill-lr", "0.05", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["distill"]["steps"] == 3 and report["distill"]["config"]["lr"] == 0.05
    assert "accuracy_distilled" in report and "distillation steps" in capsys.readouterr().out
    plain = structprune.load(pruned / "pruned.pt")  # the same pruning without the stage
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), structprune.load(out).parameters(),
                                                     strict=True))


def test_compare_adds_a_distilled_column(pruned, tmp_path, capsys):
    code = main(["compare", str(pruned / "dense.pt"), "--methods", "ispasp", "--targets", "0.5", *SMALL,
                 "--train-limit", "128", "--distill-steps", "2", "--out-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert "accuracy distilled (%)" in (tmp_path / "compare.md").read_text()
    row = json.loads((tmp_path / "compare.json").read_text())["rows"][0]
    assert "accuracy_distilled" in row and row["distill_seconds"] > 0


# -- Hugging Face model directories, on text ------------------------------------------------------------------------


def _words(n: int, seed: int) -> list[str]:
    from conftest import BERT_WORDS

    gen = torch.Generator().manual_seed(seed)
    return [" ".join(BERT_WORDS[int(i)] for i in torch.randint(0, len(BERT_WORDS), (8,), generator=gen))
            for _ in range(n)]


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """A tiny BERT and a tiny Llama-style causal LM (each with a tokenizer), and 80 sentences of their words."""
    import transformers

    from conftest import BERT_VOCAB

    root = tmp_path_factory.mktemp("text")
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)})
    torch.manual_seed(0)  # weights large enough that the pruned heads and neurons matter (0.02: they hardly do)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.3)).save_pretrained(root / "bert")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    llama.save_pretrained(root / "llama")
    for name in ("bert", "llama"):
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text("\n".join(_words(80, seed=1)) + "\n")
    return root


def test_an_encoder_directory_distils_on_text_towards_its_recorded_teacher(text_models, tmp_path, capsys):
    root = text_models
    assert main(["prune", "--hf-model", str(root / "bert"), "--text", str(root / "text.txt"), "--ratio", "0.5",
                 "--max-length", "16", "--no-progress", "--out", str(tmp_path / "pruned")]) == 0
    out = tmp_path / "distilled"
    code = main(["distill", str(tmp_path / "pruned"), "--text", str(root / "text.txt"), "--epochs", "3",
                 "--batch-size", "8", "--lr", "2e-3", "--max-length", "16", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "distilled.json").read_text())
    assert report["teacher"] == str((root / "bert").resolve()) and report["loss"] == "cosine"
    assert report["config"]["optimizer"] == "adamw" and report["steps"] == 24  # 64 sentences in batches of 8
    assert report["metric"] == "embedding_cosine_similarity"
    assert report["embedding_cosine_similarity_after"] > report["embedding_cosine_similarity_before"]
    assert structprune.load(out).encoder.layer[0].intermediate.dense.out_features == 32  # still pruned
    assert "embedding cosine similarity to the teacher" in capsys.readouterr().out


def test_prune_hf_model_distils_as_its_last_stage_on_the_calibration_sentences(text_models, tmp_path, capsys):
    root = text_models
    argv = ["prune", "--hf-model", str(root / "bert"), "--text", str(root / "text.txt"), "--ratio", "0.5",
            "--max-length", "16", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "oneshot")]) == 0
    code = main([*argv, "--distill-steps", "16", "--distill-lr", "2e-3", "--out", str(tmp_path / "pruned")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "pruned.json").read_text())
    assert report["distill"]["steps"] == 16 and report["distill"]["loss"] == "cosine"
    assert report["distill"]["config"]["optimizer"] == "adamw" and report["distill"]["config"]["lr"] == 2e-3
    # the one-shot stage is the same as without distillation; the distilled model is closer to the dense one
    oneshot = json.loads((tmp_path / "oneshot.json").read_text())
    assert report["embedding_cosine_similarity"] == pytest.approx(oneshot["embedding_cosine_similarity"], abs=1e-6)
    assert report["embedding_cosine_similarity_distilled"] > report["embedding_cosine_similarity"] + 1e-3
    # what was saved is the distilled model, still pruned: its own similarity is the distilled one
    from structprune.data import text
    from structprune.measure import embedding_similarity, sentence_embeddings

    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(root / "bert")
    held_out = text.split(text.read(str(root / "text.txt")), seed=0)[1]
    test = text.TokenBatches(held_out, tokenizer, 8, 16)
    saved = structprune.load(tmp_path / "pruned")
    assert saved.encoder.layer[0].intermediate.dense.out_features == 32
    similarity = embedding_similarity(sentence_embeddings(structprune.load(root / "bert"), test),
                                      sentence_embeddings(saved, test))
    assert similarity == pytest.approx(report["embedding_cosine_similarity_distilled"], abs=1e-5)
    assert "after 16 distillation steps" in capsys.readouterr().out


def _lm_perplexity(model, tokenizer, sentences: list[str], max_length: int) -> float:
    """transformers' own language-model loss, one sentence at a time (no padding), weighted by its predictions."""
    nll = tokens = 0
    with torch.no_grad():
        for sentence in sentences:
            ids = tokenizer(sentence, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


def test_prune_hf_model_judges_a_causal_lm_by_held_out_perplexity(text_models, tmp_path, capsys):
    """Issue 35's bug: a causal LM directory was judged as an encoder (and died on its logits)."""
    from structprune.data import text

    root = text_models
    code = main(["prune", "--hf-model", str(root / "llama"), "--text", str(root / "text.txt"), "--ratio", "0.5",
                 "--max-length", "16", "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "pruned")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "pruned.json").read_text())
    assert report["metric"] == "perplexity" and "embedding_cosine_similarity" not in report
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(root / "llama")
    held_out = text.split(text.read(str(root / "text.txt")), seed=0)[1]
    dense, pruned = structprune.load(root / "llama").eval(), structprune.load(tmp_path / "pruned").eval()
    assert pruned.model.layers[0].mlp.gate_proj.out_features == 32
    assert report["dense_perplexity"] == pytest.approx(_lm_perplexity(dense, tokenizer, held_out, 16), rel=1e-4)
    assert report["perplexity"] == pytest.approx(_lm_perplexity(pruned, tokenizer, held_out, 16), rel=1e-4)
    assert f"held-out perplexity {report['dense_perplexity']:.4f} -> " in capsys.readouterr().out


def test_a_causal_lm_directory_distils_token_distributions_and_reports_perplexity(text_models, tmp_path, capsys):
    from structprune.models import hf

    root = text_models
    dense = structprune.load(root / "llama")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(root / "llama")
    batches = [dict(tokenizer(_words(16, seed), padding=True, return_tensors="pt")) for seed in (2, 3)]
    result = structprune.prune(dense, batches, "ispasp", 0.5, progress=False)
    hf.save_pretrained(result.model, tmp_path / "pruned", tokenizer=tokenizer)  # records no teacher: --teacher
    out = tmp_path / "distilled"
    argv = ["distill", str(tmp_path / "pruned"), "--text", str(root / "text.txt"), "--epochs", "2", "--batch-size",
            "8", "--lr", "2e-3", "--no-progress", "--out", str(out)]
    code = main(argv)
    assert code == 2 and "--teacher DIR" in capsys.readouterr().err
    assert main([*argv, "--teacher", str(root / "llama")]) == 0
    report = json.loads((tmp_path / "distilled.json").read_text())
    assert report["loss"] == "kl" and report["metric"] == "perplexity"
    assert report["losses"][1] < report["losses"][0]
    assert report["perplexity_after"] > 1 and report["teacher_perplexity"] > 1
    assert "held-out perplexity" in capsys.readouterr().out
    assert structprune.load(out).model.layers[0].mlp.gate_proj.out_features == 32


def test_a_teacher_cache_and_layer_matching_from_the_command_line(pruned, tmp_path, capsys):
    cache = tmp_path / "teacher.pt"
    for out in ("a.pt", "b.pt"):
        code = main(["distill", str(pruned / "pruned.pt"), *SMALL, "--teacher-cache", str(cache), "--out",
                     str(tmp_path / out)])
        assert code == 0, capsys.readouterr().err
    assert cache.is_file()  # computed by the first run, read by the second: the same weights
    a, b = structprune.load(tmp_path / "a.pt").state_dict(), structprune.load(tmp_path / "b.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    code = main(["distill", str(pruned / "pruned.pt"), *SMALL, "--match", "conv2", "--out", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "match layers whose width the pruning kept" in err
    code = main(["distill", str(pruned / "pruned.pt"), *SMALL, "--match", "fc3", "--match-weight", "0.5",
                 "--out", str(tmp_path / "d.pt")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "d.json").read_text())["config"]["match"] == ["fc3"]


def test_compare_on_a_causal_lm_directory_reports_held_out_perplexity(text_models, tmp_path, capsys):
    """compare --hf-model: each method and target pruned on the same calibration sentences, judged by held-out
    perplexity (the same numbers prune --hf-model reports for the same run), distilled as a column of its own."""
    root = text_models
    text_args = ["--text", str(root / "text.txt"), "--max-length", "16", "--batch-size", "8", "--no-progress"]
    assert main(["compare", "--hf-model", str(root / "llama"), "--methods", "ispasp,magnitude", "--targets", "0.6",
                 "--distill-steps", "2", "--out-dir", str(tmp_path / "cmp"), *text_args]) == 0
    payload = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert payload["metric_name"] == "perplexity" and [r["method"] for r in payload["rows"]] == ["ispasp", "magnitude"]
    assert all({"perplexity_pruned", "perplexity_distilled"} <= set(r) for r in payload["rows"])
    assert "| perplexity pruned | perplexity distilled |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert main(["prune", "--hf-model", str(root / "llama"), "--target-flops", "0.6", "--out",
                 str(tmp_path / "pruned"), *text_args]) == 0
    report = json.loads((tmp_path / "pruned.json").read_text())
    assert payload["dense_perplexity"] == pytest.approx(report["dense_perplexity"], rel=1e-6)
    assert payload["rows"][0]["perplexity_pruned"] == pytest.approx(report["perplexity"], rel=1e-6)
    assert payload["rows"][0]["macs_ratio"] == pytest.approx(report["macs_ratio"])
    capsys.readouterr()
    assert main(["compare", "--hf-model", str(root / "llama"), "--finetune-epochs", "1", "--out-dir",
                 str(tmp_path / "no"), *text_args]) == 2
    assert "--distill-steps" in capsys.readouterr().err and not (tmp_path / "no" / "compare.json").exists()
    assert main(["compare", str(tmp_path / "pruned.json"), "--hf-model", str(root / "llama"), "--out-dir",
                 str(tmp_path / "no"), *text_args]) == 2
    assert "give either a checkpoint, --model SPEC or --hf-model DIR" in capsys.readouterr().err
