"""Distillation (structprune.distill): the losses against their definitions (torch's own KL divergence, cosine,
transformers' own language-model loss for perplexity), the loop's accumulation, step limit and resume against the
plain runs they must equal, and the student moving towards the teacher."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import structprune
from structprune import measure
from structprune.distill import DistillConfig, Loss, distill
from structprune.errors import StructPruneError
from structprune.finetune import ShardedBatches
from structprune.run_state import RunState


def _loss(config: DistillConfig, student, teacher, batch):
    return Loss(config.resolved(student, torch.device("cpu")), torch.device("cpu"))(student, teacher, batch)


class Fixed(nn.Module):
    """A model whose output is a given tensor (as logits of a Hugging Face output, or plain)."""

    def __init__(self, value: torch.Tensor, wrap: str | None = None):
        super().__init__()
        self.value = nn.Parameter(value.clone())
        self.wrap = wrap

    def forward(self, x=None, input_ids=None, attention_mask=None):
        return SimpleNamespace(**{self.wrap: self.value}) if self.wrap else self.value


def test_the_classifier_loss_is_torchs_kl_divergence_at_the_temperature():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    for temperature in (1.0, 2.5):
        total, count = _loss(DistillConfig(temperature=temperature), Fixed(s), Fixed(t), torch.zeros(6, 1))
        reference = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                             reduction="sum") * temperature ** 2
        assert float(count) == 6
        assert torch.allclose(total, reference, atol=1e-5)


def test_token_losses_count_only_real_tokens():
    """A causal LM's KL (per token, over the vocabulary) and an encoder's cosine leave padded tokens out: changing
    the outputs there changes nothing, and the sum is over the real tokens of F.kl_div / F.cosine_similarity."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 7, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    real = mask.bool()
    kl = F.kl_div(F.log_softmax(s[real], -1), F.log_softmax(t[real], -1), log_target=True, reduction="sum")
    cosine = (1 - F.cosine_similarity(s[real], t[real], dim=-1)).sum()
    for wrap, reference in (("logits", kl), ("last_hidden_state", cosine)):
        total, count = _loss(DistillConfig(), Fixed(s, wrap), Fixed(t, wrap), batch)
        assert float(count) == 5 and torch.allclose(total, reference, atol=1e-5)
        noisy = s.clone()
        noisy[~real] += 100.0
        assert torch.allclose(_loss(DistillConfig(), Fixed(noisy, wrap), Fixed(t, wrap), batch)[0], total)


def test_alpha_mixes_in_the_cross_entropy_and_needs_labels():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    labels = torch.tensor([0, 2, 1, 1])
    kd, _ = _loss(DistillConfig(), Fixed(s), Fixed(t), (torch.zeros(4, 1), labels))
    mixed, _ = _loss(DistillConfig(alpha=0.25), Fixed(s), Fixed(t), (torch.zeros(4, 1), labels))
    assert torch.allclose(mixed, 0.75 * kd + 0.25 * F.cross_entropy(s, labels, reduction="sum"), atol=1e-5)
    with pytest.raises(StructPruneError, match="the batches have none"):
        _loss(DistillConfig(alpha=0.25), Fixed(s), Fixed(t), torch.zeros(4, 1))


def test_a_teacher_of_another_shape_is_refused_in_one_line():
    with pytest.raises(StructPruneError, match=r"outputs \(4, 3\) but the teacher \(4, 5\)"):
        _loss(DistillConfig(), Fixed(torch.zeros(4, 3)), Fixed(torch.zeros(4, 5)), torch.zeros(4, 1))


def _pair(seed: int = 0):
    """A teacher MLP (with BatchNorm) and a student: the teacher pruned to half its hidden neurons, no refit."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(256, 8)
    result = structprune.prune(teacher, [x[i:i + 64] for i in range(0, 256, 64)], "magnitude", 0.5, refit=False,
                               recalibrate=False, progress=False)
    return teacher, result.model, x


def _kl_on(student, teacher, x) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student.eval()(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                              reduction="batchmean"))


def test_the_student_moves_to_the_teacher_which_stays_as_it_was():
    teacher, student, x = _pair()
    frozen = copy.deepcopy(teacher.state_dict())
    held_out = torch.randn(512, 8, generator=torch.Generator().manual_seed(9))
    before = _kl_on(student, teacher, held_out)
    stats = student[1].running_mean.clone()
    result = distill(student, teacher, ShardedBatches(TensorDataset(x), 32), DistillConfig(epochs=4, lr=0.05),
                     progress=False)
    assert result.loss == "kl" and result.steps == 32 and result.config["optimizer"] == "sgd"
    assert _kl_on(student, teacher, held_out) < 0.5 * before
    assert not torch.equal(student[1].running_mean, stats)  # the student trained in train mode: its BN followed
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())  # the teacher: untouched
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_accumulating_two_half_batches_is_one_whole_batch():
    """The same permutation cut in batches of 16 pairs up into its batches of 32: two accumulated half batches make
    the same steps as the whole ones (no BatchNorm here: its statistics depend on the batch)."""
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    start = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = TensorDataset(torch.randn(128, 8))
    whole, halves = copy.deepcopy(start), copy.deepcopy(start)
    distill(whole, teacher, ShardedBatches(data, 32, seed=5), DistillConfig(epochs=2, lr=0.1), progress=False)
    distill(halves, teacher, ShardedBatches(data, 16, seed=5), DistillConfig(epochs=2, lr=0.1, accumulate=2),
            progress=False)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(whole.parameters(), start.parameters(), strict=True))
    assert moved > 1e-2
    for a, b in zip(whole.parameters(), halves.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_steps_stop_the_run_where_a_run_of_that_length_ends():
    """steps=3 over batches of 16 (8 per epoch) takes the 3 steps a run over the first 48 samples (shuffled alike)
    takes in its one epoch of 3 batches: the same schedule, the same weights."""
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Linear(8, 4))
    start = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(128, 8)
    limited, short = copy.deepcopy(start), copy.deepcopy(start)
    result = distill(limited, teacher, ShardedBatches(TensorDataset(x), 16, shuffle=False),
                     DistillConfig(steps=3, lr=0.1), progress=False)
    distill(short, teacher, ShardedBatches(TensorDataset(x[:48]), 16, shuffle=False), DistillConfig(lr=0.1),
            progress=False)
    assert result.steps == 3 and len(result.losses) == 1
    for a, b in zip(limited.parameters(), short.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_an_interrupted_run_resumed_ends_with_the_same_weights(tmp_path, monkeypatch):
    teacher, student, x = _pair(seed=5)
    config = DistillConfig(epochs=3, lr=0.05)
    whole = copy.deepcopy(student)
    distill(whole, teacher, ShardedBatches(TensorDataset(x), 32, seed=1), config, progress=False)
    save = RunState.save

    def stop_after_first_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "save", stop_after_first_save)
    state = tmp_path / "out.pt.state"
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, ShardedBatches(TensorDataset(x), 32, seed=1), config, progress=False,
                state_path=state)
    monkeypatch.setattr(RunState, "save", save)
    assert state.exists()
    torch.manual_seed(123)  # the state restores the random state, whatever happened in between
    result = distill(student, teacher, ShardedBatches(TensorDataset(x), 32, seed=1), config, progress=False,
                     state_path=state, resume=True)
    assert len(result.losses) == 3 and not state.exists()
    for a, b in zip(whole.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(StructPruneError, match="other distillation options"):
        RunState(state, {"lr": 1}, "distillation").save({"epoch": 1, "losses": []})
        distill(student, teacher, ShardedBatches(TensorDataset(x), 32, seed=1), config, progress=False,
                state_path=state, resume=True)


def test_options_out_of_range_are_one_line_errors():
    for bad, match in (({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"), ({"alpha": 2}, "alpha"),
                       ({"loss": "l1"}, "loss"), ({"warmup": 1}, "warmup"), ({"optimizer": "adam"}, "optimizer")):
        with pytest.raises(StructPruneError, match=match):
            DistillConfig(**bad)


def test_transformers_get_adamw_and_clipping_by_default():
    from conftest import tiny_bert

    config = DistillConfig().resolved(tiny_bert(), torch.device("cpu"))
    assert (config.optimizer, config.lr, config.max_grad_norm, config.autocast) == ("adamw", 1e-4, 1.0, "off")
    config = DistillConfig().resolved(nn.Linear(2, 2), torch.device("cpu"))
    assert (config.optimizer, config.max_grad_norm) == ("sgd", None)


def test_perplexity_is_the_exponent_of_transformers_own_language_model_loss():
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    assert measure.perplexity(model, [batch]) == pytest.approx(reference, rel=1e-5)
    padded = {"input_ids": torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(3, 4, dtype=torch.long)], 1)}
    assert measure.perplexity(model, [padded]) == pytest.approx(reference, rel=1e-4)  # padding is left out


def test_agreement_counts_equal_top_classes():
    a = Fixed(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    b = Fixed(torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 0.0]]))
    assert measure.agreement(a, b, [torch.zeros(4, 1)]) == 50.0
    assert measure.agreement(a, a, [(torch.zeros(4, 1), torch.zeros(4))]) == 100.0


@pytest.mark.parametrize("dropout", [False, True])
def test_only_batchnorm_trains_unless_dropout_is_asked_for(dropout):
    torch.manual_seed(6)
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    teacher = copy.deepcopy(student).eval()
    seen = set()
    for module in (student[1], student[2]):
        module.register_forward_hook(lambda m, i, o: seen.add((type(m).__name__, m.training)))
    distill(student, teacher, ShardedBatches(TensorDataset(torch.randn(64, 8)), 32),
            DistillConfig(dropout=dropout), progress=False)
    assert seen == {("BatchNorm1d", True), ("Dropout", dropout)}
    assert not student.training  # eval mode at the end


def test_a_teacher_cache_trains_alike_and_spares_the_teacher(tmp_path):
    """With the teacher's outputs cached the run ends with the same weights; a second run reads the file and never
    calls the teacher; a file of another teacher is refused."""
    teacher, student, x = _pair(seed=7)
    plain, cached, again = copy.deepcopy(student), copy.deepcopy(student), copy.deepcopy(student)
    config = DistillConfig(epochs=2, lr=0.05)
    distill(plain, teacher, ShardedBatches(TensorDataset(x), 32, seed=2), config, progress=False)
    cache = tmp_path / "teacher.pt"
    distill(cached, teacher, ShardedBatches(TensorDataset(x), 32, seed=2), config, progress=False,
            teacher_cache=cache)
    for a, b in zip(plain.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    distill(again, teacher, ShardedBatches(TensorDataset(x), 32, seed=2), config, progress=False,
            teacher_cache=cache)
    assert not calls and all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(),
                                                                again.state_dict().values(), strict=True))
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other[0].weight.add_(0.1)
    with pytest.raises(StructPruneError, match="another teacher or other data"):
        distill(copy.deepcopy(student), other, ShardedBatches(TensorDataset(x), 32), config, progress=False,
                teacher_cache=cache)


def test_matching_adds_the_relative_error_of_the_named_layers():
    """match=("1",) adds, per sample, ‖s − t‖²/‖t‖² of layer 1's outputs (mean over elements), brought to the
    loss's units; a layer whose width the pruning changed is refused; the hooks are gone afterwards."""
    torch.manual_seed(8)
    teacher = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)
    x = torch.randn(10, 8)
    config = DistillConfig(match=("1",), match_weight=0.3)
    from structprune.distill import Matcher

    matcher = Matcher(student, teacher, config.match)
    total, count = Loss(config.resolved(student, torch.device("cpu")), torch.device("cpu"), matcher=matcher)(
        student, teacher, x)
    matcher.close()
    plain, _ = _loss(DistillConfig(), student, teacher, x)
    with torch.no_grad():
        s, t = torch.tanh(student[0](x)), torch.tanh(teacher[0](x))
    relative = ((s - t).pow(2).mean(1) / t.pow(2).mean(1)).sum()
    assert torch.allclose(total, plain + 0.3 * relative, atol=1e-5) and float(count) == 10
    pruned = structprune.prune(teacher, [x], "magnitude", 0.5, progress=False).model
    with pytest.raises(StructPruneError, match="match layers whose width the pruning kept"):
        distill(pruned, teacher, [x], DistillConfig(match=("1",)), progress=False)
    with pytest.raises(StructPruneError, match="names no layer"):
        distill(copy.deepcopy(student), teacher, [x], DistillConfig(match=("encoder.*",)), progress=False)
    assert not any(m._forward_hooks for m in (*pruned.modules(), *teacher.modules()))


def test_bf16_autocast_trains_on_the_cpu_too():
    """autocast="bf16" runs the forward passes in bfloat16 (the loss in float32) and still trains."""
    teacher, student, x = _pair(seed=9)
    held_out = torch.randn(256, 8, generator=torch.Generator().manual_seed(10))
    before = _kl_on(student, teacher, held_out)
    dtypes = set()
    hook = student[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = distill(student, teacher, ShardedBatches(TensorDataset(x), 32), DistillConfig(epochs=4, lr=0.05,
                                                                                         autocast="bf16"),
                     progress=False)
    hook.remove()
    assert dtypes == {torch.bfloat16}  # every training forward ran under autocast
    assert result.config["autocast"] == "bf16" and _kl_on(student, teacher, held_out) < 0.5 * before
    assert all(p.dtype == torch.float32 for p in student.parameters())
