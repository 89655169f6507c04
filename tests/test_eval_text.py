"""``structprune eval DIR --text``: Hugging Face model directories judged on held-out text (issue 35's
``unrecognized arguments: --text``), and the sliding-window perplexity it reports, against the loop of transformers'
perplexity guide with the model's own language-model loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

import structprune
from conftest import BERT_VOCAB, BERT_WORDS, tiny_bert
from structprune.cli import main
from structprune.data import text
from structprune.measure import sliding_perplexity

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make install`


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)).eval()


def _guide_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """transformers' perplexity guide, with the model's own loss: labels of tokens an earlier window predicted are
    -100, and each window's loss is weighted by the tokens it predicts (the loss shifts labels by one itself)."""
    nll, predicted, previous_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len, len(ids))
            window = ids[begin:end][None]
            labels = window.clone()
            labels[:, :-(end - previous_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())
            if scored:
                nll += float(model(input_ids=window, labels=labels).loss) * scored
                predicted += scored
            previous_end = end
            if end == len(ids):
                break
    return math.exp(nll / predicted)


@pytest.mark.parametrize("seq_len, stride", [(16, 8), (16, 16), (16, 5), (64, 64), (7, 1)])
def test_sliding_perplexity_is_the_guides(seq_len, stride):
    model = _llama()
    ids = torch.randint(0, len(BERT_VOCAB), (53,), generator=torch.Generator().manual_seed(1))
    ours = sliding_perplexity(model, ids, seq_len, stride)
    assert ours == pytest.approx(_guide_perplexity(model, ids, seq_len, stride), rel=1e-5)


def test_sliding_perplexity_refuses_what_it_cannot_read():
    model = _llama()
    with pytest.raises(structprune.StructPruneError, match="stride"):
        sliding_perplexity(model, torch.arange(20), 8, 9)
    with pytest.raises(structprune.StructPruneError, match="fewer than 2 tokens"):
        sliding_perplexity(model, torch.arange(1), 8, 4)


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """A tiny Llama-style model, a copy pruned to half its FFN neurons, a tiny BERT (each with a tokenizer), text."""
    root = tmp_path_factory.mktemp("eval_text")
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)})
    gen = torch.Generator().manual_seed(3)
    sentences = [" ".join(BERT_WORDS[int(i)] for i in torch.randint(0, len(BERT_WORDS), (9,), generator=gen))
                 for _ in range(60)]
    (root / "text.txt").write_text("\n".join(sentences) + "\n")
    dense = _llama()
    calib = [dict(tokenizer(sentences[:16], padding=True, return_tensors="pt"))]
    pruned = structprune.prune(dense, calib, "ispasp", {"*.mlp": 0.5}, progress=False).model
    for name, model in (("llama", dense), ("llama-half", pruned), ("bert", tiny_bert())):
        structprune.models.hf.save_pretrained(model, root / name, tokenizer=tokenizer)
    return root


def test_eval_reports_the_held_out_perplexity_of_causal_lm_directories(directories, tmp_path, capsys):
    root = directories
    code = main(["eval", str(root / "llama"), str(root / "llama-half"), "--text", str(root / "text.txt"),
                 "--seq-len", "32", "--stride", "16", "--no-progress", "--json", str(tmp_path / "eval.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metric"] == "perplexity" and (report["seq_len"], report["stride"]) == (32, 16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "llama")
    held_out = text.split(text.read(str(root / "text.txt")), seed=0)[1]
    ids = tokenizer("\n\n".join(held_out), return_tensors="pt")["input_ids"][0]
    assert report["tokens"] == len(ids) and report["held_out_sentences"] == len(held_out)
    for row, name in zip(report["rows"], ("llama", "llama-half"), strict=True):
        model = structprune.load(root / name).eval()
        assert row["perplexity"] == pytest.approx(_guide_perplexity(model, ids, 32, 16), rel=1e-5)
        assert row["params"] == sum(p.numel() for p in model.parameters())
    assert report["rows"][1]["params"] < report["rows"][0]["params"]
    table = capsys.readouterr().out
    assert f"| {root / 'llama-half'} |" in table and "| perplexity |" in table


def test_eval_judges_encoders_by_embedding_cosine_to_the_first(directories, tmp_path, capsys):
    root = directories
    assert main(["eval", str(root / "bert"), str(root / "bert"), "--text", str(root / "text.txt"), "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["embedding_cosine_similarity"] for r in rows] == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["{root}/llama", "{root}/bert"], "evaluate each kind in its own call"),
    (["{root}/llama", "model.pt"], "model.pt: not a Hugging Face model directory"),
    (["model.pt", "--text", "{root}/text.txt"], "model.pt: not a Hugging Face model directory"),
    (["{root}/llama", "--data", "digits"], "--data: Hugging Face model directories are evaluated on --text"),
    (["{root}/llama", "--seq-len", "8", "--stride", "9"], "--stride must be in [1, --seq-len = 8], got 9"),
])
def test_eval_text_errors_are_one_line(directories, tmp_path, capsys, argv, message):
    argv = [a.format(root=directories) for a in argv]
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        code = main(["eval", *argv, "--no-progress", "--text" if "--text" not in argv else "--no-progress",
                     *([str(directories / "text.txt")] if "--text" not in argv else [])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
