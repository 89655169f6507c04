"""Encoder-decoders on the Hugging Face path (issue 35: "by what the model is, never by assuming one kind"): their
sentence embeddings are the encoder's and the decoder's, and prune --hf-model judges them; model directories as
outputs are replaced with --force only where they hold a model."""

from __future__ import annotations

import json

import pytest
import torch

import structprune
from conftest import BERT_VOCAB, text_model_dir
from structprune.cli import main
from structprune.measure import embedding_similarity, sentence_embeddings

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by `make install`


def _bart(cls=None):
    torch.manual_seed(0)  # weights large enough that pruning shows (0.02: the layers hardly touch the stream)
    return (cls or transformers.BartForConditionalGeneration)(transformers.BartConfig(
        vocab_size=len(BERT_VOCAB), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        init_std=0.3)).eval()


def _pooled(hidden, mask):
    mask = mask[..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("cls", ["BartModel", "BartForConditionalGeneration"])
def test_an_encoder_decoders_embeddings_are_its_encoders_and_its_decoders(cls):
    model = _bart(getattr(transformers, cls))
    ids = torch.randint(5, len(BERT_VOCAB), (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    base = model.get_encoder()
    with torch.no_grad():
        encoded = base(input_ids=ids, attention_mask=mask).last_hidden_state
        shifted = torch.cat([torch.full_like(ids[:, :1], model.config.decoder_start_token_id), ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        decoded = model.get_decoder()(input_ids=shifted, attention_mask=decoder_mask, encoder_hidden_states=encoded,
                                      encoder_attention_mask=mask).last_hidden_state
    reference = torch.cat([_pooled(encoded, mask), _pooled(decoded, decoder_mask)], dim=1) / 2 ** 0.5
    ours = sentence_embeddings(model, [{"input_ids": ids, "attention_mask": mask}])
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3))


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return text_model_dir(tmp_path_factory.mktemp("bart"), "bart", _bart())


def test_prune_hf_model_prunes_and_judges_an_encoder_decoder(bart_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--hf-model", str(bart_dir / "bart"), "--text", str(bart_dir / "text.txt"), "--ratio", "0.5",
            "--max-length", "16", "--batch-size", "8", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "pruned.json").read_text())
    assert report["metric"] == "embedding_cosine_similarity" and report["embedding_cosine_similarity"] < 0.99
    tokenizer = transformers.AutoTokenizer.from_pretrained(bart_dir / "bart")
    from structprune.data import text

    held_out = text.TokenBatches(text.split(text.read(str(bart_dir / "text.txt")), seed=0)[1], tokenizer, 8, 16)
    similarity = embedding_similarity(sentence_embeddings(structprune.load(bart_dir / "bart"), held_out),
                                      sentence_embeddings(structprune.load(out), held_out))
    assert similarity == pytest.approx(report["embedding_cosine_similarity"], abs=1e-5)
    # again into the same directory: refused, then replaced with --force
    assert main(argv) == 2 and "already exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    # a directory that holds no model is never replaced, even with --force
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    argv[-1] = str(other)
    assert main([*argv, "--force"]) == 2 and "holds no model" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_tied_parameters_are_optimised_once():
    """BART ties its embeddings to the LM head: each parameter in one optimizer group, once (torch warns of, and
    will refuse, a parameter twice)."""
    from structprune.finetune import parameter_groups

    model = _bart()
    groups = parameter_groups(model, 0.01)
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))
    assert len(list(model.parameters())) < len(dict(model.named_parameters(remove_duplicate=False)))  # tied
