"""Width (hidden-size) pruning of a Llama-style decoder (issue 35, item 2): the residual stream's channels removed
from embeddings, norms and every projection, checked against the same model built by hand at the smaller width."""

from __future__ import annotations

import json

import pytest
import torch

import structprune
from structprune.cli import main
from structprune.hidden import prune_hidden

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)


def _llama(tied: bool = False):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (8, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[:4, 8:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _by_hand(model, kept: torch.Tensor):
    """The dense model's weights sliced to the kept channels by name, in a model built at that width."""
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**CONFIG, "hidden_size": len(kept), "head_dim": 8},
        tie_word_embeddings=model.config.tie_word_embeddings)).eval()
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = value[kept]
        elif "embed_tokens" in name or name.startswith("lm_head") or any(
                p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            value = value[:, kept]
        elif "o_proj" in name or "down_proj" in name:
            value = value[kept]
        state[name] = value
    small.load_state_dict(state)
    return small


def _importance(model, batches) -> torch.Tensor:
    """Σ over the RMSNorms' outputs and the real tokens of each channel's square."""
    total = torch.zeros(CONFIG["hidden_size"], dtype=torch.float64)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    outputs = []
    for batch in batches:
        outputs.clear()
        handles = [n.register_forward_hook(lambda m, a, o: outputs.append(o)) for n in norms]
        with torch.no_grad():
            model(**batch)
        for h in handles:
            h.remove()
        for out in outputs:
            total += out[batch["attention_mask"].bool()].double().square().sum(0)
    return total


def test_without_refit_it_is_the_model_built_at_that_width_from_the_channels_of_most_energy():
    model, batches = _llama(), _batches()
    result = prune_hidden(model, batches, 24, refit=False, progress=False)
    expected = torch.sort(torch.topk(_importance(model, batches), 24).indices).values
    assert result.kept == expected.tolist() and result.model.config.hidden_size == 24
    with torch.no_grad():
        assert torch.allclose(result.model(**batches[0]).logits, _by_hand(model, expected)(**batches[0]).logits,
                              atol=1e-5)
    assert model.config.hidden_size == 32 and model.lm_head.in_features == 32  # the input model is left alone
    whole = prune_hidden(model, batches, 32, progress=False)
    with torch.no_grad():
        assert torch.equal(whole.model(**batches[0]).logits, model(**batches[0]).logits)


def test_the_refit_solves_each_readers_least_squares_on_the_pruned_norms_output():
    """q_proj of the first layer: its refitted weight is the least-squares map from the pruned RMSNorm's output (over
    the kept channels of the dense stream) to the dense q_proj output, on the real tokens (lstsq here)."""
    model, batches = _llama(), _batches()
    result = prune_hidden(model, batches, 20, progress=False)
    kept = torch.tensor(result.kept)
    layer = model.model.layers[0]
    seen = {}
    handle = layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.update(h=a[0], y=o))
    with torch.no_grad():
        model(**batches[0])
    handle.remove()
    real = batches[0]["attention_mask"].bool()
    h = seen["h"][real].double()[:, kept]
    norm = layer.input_layernorm
    with torch.no_grad():
        x = norm.weight.double()[kept] * h / torch.sqrt(h.square().mean(1, keepdim=True) + norm.variance_epsilon)
        y = (seen["y"][real].double() @ layer.self_attn.q_proj.weight.double().T)
        solution = torch.linalg.lstsq(x, y).solution.T
        fitted = result.model.model.layers[0].self_attn.q_proj.weight.double()
    assert result.refit["model.layers.0.self_attn.q_proj"]["applied"]
    assert torch.allclose(fitted, solution, rtol=0, atol=2e-3 * float(solution.abs().max()))
    unfitted = prune_hidden(model, batches, 20, refit=False, progress=False).model
    with torch.no_grad():
        error = {name: float(((m.model.layers[0].self_attn.q_proj.weight.double() @ x.T).T - y).square().sum())
                 for name, m in (("refit", result.model), ("sliced", unfitted))}
    assert error["refit"] < error["sliced"]


def test_tied_embeddings_stay_tied_and_transformers_reloads_the_model(tmp_path):
    model, batches = _llama(tied=True), _batches()
    result = prune_hidden(model, batches, 24, progress=False)
    pruned = result.model
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert result.refit["lm_head"] == "not refitted: tied to the embeddings"
    pruned.save_pretrained(tmp_path / "m")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(**batches[0]).logits, pruned(**batches[0]).logits)
    assert back.config.hidden_size == 24


def test_what_is_not_a_causal_lm_or_a_bad_count_is_refused():
    from conftest import tiny_bert

    with pytest.raises(structprune.StructPruneError, match="no LM head"):
        prune_hidden(tiny_bert(), [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], 16, progress=False)
    for keep in (0, 33, 1.5, True, "0.75", None):
        with pytest.raises(structprune.StructPruneError, match="keep must be"):
            prune_hidden(_llama(), _batches(), keep, progress=False)


def test_prune_hf_model_prunes_the_width_then_heads_and_ffn(tmp_path, capsys):
    from conftest import BERT_VOCAB, BERT_WORDS

    root = tmp_path / "llama"
    _llama().save_pretrained(root)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}).save_pretrained(root)
    words = [" ".join(BERT_WORDS[(i * 7 + j) % len(BERT_WORDS)] for j in range(9)) for i in range(60)]
    (tmp_path / "text.txt").write_text("\n".join(words) + "\n")
    argv = ["prune", "--hf-model", str(root), "--text", str(tmp_path / "text.txt"), "--max-length", "16",
            "--no-progress"]
    assert main([*argv, "--prune", "hidden,ffn", "--hidden-keep", "0.75", "--ratio", "0.5", "--out",
                 str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["hidden"]["hidden_before"] == 32 and report["hidden"]["hidden_after"] == 24
    assert "hidden size 32 -> 24" in capsys.readouterr().out
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.hidden_size == 24 and back.model.layers[0].mlp.up_proj.weight.shape == (32, 24)
    assert main([*argv, "--hidden-keep", "24", "--out", str(tmp_path / "no")]) == 2
    assert "--hidden-keep goes with --prune hidden" in capsys.readouterr().err
    assert main([*argv, "--prune", "hidden", "--out", str(tmp_path / "no")]) == 2
    assert "--prune hidden needs --hidden-keep N" in capsys.readouterr().err and not (tmp_path / "no").exists()
