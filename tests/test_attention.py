"""Architectures the generic graph must not prune silently wrong: attention heads outside the BERT layout,
outputs that other layers also read, layers that run more than once per forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import structprune
from structprune.capture import capture
from structprune.graph import PruningGraph


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


def _prune_recording(model, calib, ratio=0.5):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = structprune.prune(model, calib, "magnitude", ratio, progress=False)
    return result, [str(w.message) for w in caught if str(w.message).startswith("structprune")]


def test_multihead_attention_embed_dim_is_never_shrunk():
    torch.manual_seed(0)
    model = _Encoder().eval()
    result, messages = _prune_recording(model, [torch.randn(8, 5, 6)])
    attn = result.model.enc.self_attn
    assert (attn.embed_dim, attn.head_dim, attn.num_heads) == (16, 8, 2)
    assert any("nn.MultiheadAttention enc.self_attn would lose embed_dim channels" in m
               and "Linear q/k/v/o" in m for m in messages)
    assert result.model.enc.linear1.out_features == 16  # the FFN is still pruned
    assert result.model(torch.randn(2, 5, 6)).shape == (2, 3)


class _OwnAttention(nn.Module):
    """Multi-head self-attention whose layers no registered layout names (to_q, to_k, to_v, to_out)."""

    def __init__(self, width: int = 16, heads: int = 4):
        super().__init__()
        self.n_heads, self.size = heads, width // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.to_out = nn.Linear(width, width)

    def forward(self, x):
        split = lambda t: t.view(*x.shape[:2], -1, self.size).transpose(1, 2)  # noqa: E731
        context = nn.functional.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)),
                                                             split(self.to_v(x)))
        return x + self.to_out(context.transpose(1, 2).reshape(*x.shape[:2], -1))


class _OwnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = _OwnAttention()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.attn(self.inp(x))
        return self.head((h + self.mlp(h)).mean(1))


def test_heads_of_an_undescribed_attention_are_refused_not_mixed():
    torch.manual_seed(0)
    result, messages = _prune_recording(_OwnBlock().eval(), [torch.randn(8, 5, 6)])
    attn = result.model.attn
    assert all(layer.out_features == 16 for layer in (attn.to_q, attn.to_k, attn.to_v))
    assert any("heads of attention attn" in m and "structprune.attention.register" in m for m in messages)
    assert result.model.mlp[0].out_features == 16  # the rest is still pruned
    assert result.model(torch.randn(2, 5, 6)).shape == (2, 3)


def test_a_layout_given_as_data_prunes_that_attention_in_whole_heads():
    """Describing the module (which attributes hold q/k/v/o and the head size) is all a new family takes."""
    from structprune import attention

    layout = attention.AttentionLayout("own", query="to_q", key="to_k", value="to_v", output="to_out",
                                       head_dim="size", heads=("n_heads",))
    attention.register(layout)
    try:
        torch.manual_seed(0)
        model, x = _OwnBlock().eval(), torch.randn(8, 5, 6)
        result = structprune.prune(model, [x], "ispasp", {"attn": 0.5}, refit=False, progress=False)
        attn = result.model.attn
        assert attn.n_heads == 2 and attn.to_q.out_features == attn.to_v.out_features == attn.to_out.in_features == 8
        kept = [g for g in result.layers if g["group"] == "attn"][0]
        assert (kept["channels"], kept["kept"]) == (4, 2)
        assert result.model(x).shape == (8, 3)
    finally:
        attention._ATTENTION.remove(layout)


class _TwoOutputs(nn.Module):
    """A hidden state that is an output of the model and also read by the next layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc3(torch.relu(self.fc2(torch.relu(hidden)))), hidden


def test_a_layer_whose_output_is_returned_keeps_it_whole_even_when_others_read_it():
    torch.manual_seed(0)
    result = structprune.prune(_TwoOutputs().eval(), [torch.randn(16, 4)], "magnitude", 0.5, progress=False)
    logits, hidden = result.model(torch.randn(2, 4))
    assert logits.shape == (2, 2) and hidden.shape == (2, 8)
    assert [layer["group"] for layer in result.layers] == ["fc2"]


def test_albert_keeps_its_last_hidden_state_width():
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)
    model = transformers.AlbertModel(config).eval()
    ids = torch.randint(0, 50, (4, 7))
    result, _ = _prune_recording(model, [{"input_ids": ids}])
    out = result.model(ids)
    assert out.last_hidden_state.shape == (4, 7, 32) and out.pooler_output.shape == (4, 32)
    assert result.after["params"] < result.before["params"]


class _Shared(nn.Module):
    """One layer applied twice per forward (weight sharing, as in ALBERT)."""

    def __init__(self):
        super().__init__()
        self.up, self.shared, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.head(self.shared(torch.relu(self.shared(h))))


def test_a_layer_run_twice_per_batch_counts_each_sample_once():
    torch.manual_seed(0)
    model = _Shared().eval()
    x = torch.randn(10, 3)
    graph = PruningGraph(model, x[:1])
    (group,) = graph.all_groups()  # up's outputs, and shared's inputs and outputs: one coupled group
    view = capture(model, group, [x[:6], x[6:]])
    consumer = next(c for c in view.consumers if c.name == "shared")
    assert consumer.sample_sums.shape == (10, 6)
    assert sorted(set(consumer.row_sample.tolist())) == list(range(10))
    assert torch.equal(view.restrict(4).consumers[0].row_sample.unique(), torch.arange(4))


def test_a_transformers_model_pruned_outside_its_described_blocks_is_not_saved_as_an_unloadable_directory(tmp_path):
    """T5 has no layout: its attention stays whole, its FFN is pruned by the generic graph, which the config
    cannot record; saving it as a save_pretrained directory would write files that load nowhere."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    model = transformers.T5EncoderModel(config).eval()
    result, messages = _prune_recording(model, [{"input_ids": torch.randint(0, 50, (4, 7))}])
    assert any("matches no registered layout" in m or "heads of attention" in m for m in messages)
    with pytest.raises(structprune.StructPruneError, match=r"T5EncoderModel cannot be saved .* is \(16, 16\)"):
        structprune.save(result, tmp_path / "t5")
    assert not (tmp_path / "t5").exists()
