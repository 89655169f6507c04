"""Trust: no file runs code on load, every bad input is one clear line, nothing of the user's is lost."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import structprune
from structprune import checkpoint
from structprune.cli import main
from structprune.errors import StructPruneError


class _Evil:
    """Unpickling this creates ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def evil(tmp_path):
    """A structprune-0.1-style checkpoint whose pickle would create a marker file, and the marker."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "structprune", "version": 1, "module": _Evil(marker)}, path)
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_through_the_api(evil):
    path, marker = evil
    for load in (structprune.load, checkpoint.read):
        with pytest.raises(StructPruneError, match="holds pickled Python objects; loading it would run any code"):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["info", "{ckpt}"],
    ["eval", "{ckpt}", "--data", "synthetic"],
    ["prune", "{ckpt}", "--data", "synthetic", "--out", "{tmp}/p.pt"],
    ["finetune", "{ckpt}", "--data", "synthetic", "--out", "{tmp}/f.pt"],
    ["compare", "{ckpt}", "--data", "synthetic", "--out-dir", "{tmp}/cmp"],
    ["convert", "{ckpt}", "{tmp}/c.pt"],
])
def test_a_crafted_checkpoint_runs_no_code_through_any_command(evil, tmp_path, capsys, command):
    path, marker = evil
    code, _, err = run_cli(capsys, *[a.format(ckpt=path, tmp=tmp_path) for a in command])
    assert code == 2 and err.count("\n") == 1
    assert "holds pickled Python objects" in err and "--trust-checkpoint" in err
    assert not marker.exists()
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "f.pt").exists()


def test_a_crafted_schedule_state_runs_no_code_on_resume(tmp_path, capsys, fmnist_dir):
    ckpt, out = tmp_path / "m.pt", tmp_path / "p.pt"
    structprune.save(structprune.models.create("lenet300"), ckpt)
    marker = tmp_path / "pwned"
    torch.save({"format": "structprune-schedule", "progress": _Evil(marker)}, tmp_path / "p.pt.state")
    code, _, err = run_cli(capsys, "prune", ckpt, "--schedule", "cascade", "--resume", "--data-dir", fmnist_dir,
                           "--out", out, "--no-progress")
    assert code == 2 and "state" in err and "holds pickled Python objects" in err and "Delete it" in err
    assert not marker.exists()


def test_a_crafted_training_state_runs_no_code_on_resume(tmp_path, capsys, fmnist_dir):
    ckpt, out = tmp_path / "m.pt", tmp_path / "f.pt"
    structprune.save(structprune.models.create("lenet300"), ckpt)
    marker = tmp_path / "pwned"
    torch.save({"config": _Evil(marker)}, tmp_path / "f.pt.state")
    code, _, err = run_cli(capsys, "finetune", ckpt, "--resume", "--data-dir", fmnist_dir, "--limit", "32",
                           "--out", out, "--no-progress")
    assert code == 2 and "holds pickled Python objects" in err
    assert not marker.exists()


def test_a_hugging_face_directory_with_a_crafted_pickle_runs_no_code(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "hf"
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    config.architectures = ["BertModel"]
    config.save_pretrained(directory)
    marker = tmp_path / "pwned"
    torch.save({"embeddings.word_embeddings.weight": _Evil(marker)}, directory / "pytorch_model.bin")
    with pytest.raises(StructPruneError, match="holds pickled Python objects"):
        structprune.load(directory)
    code, _, err = run_cli(capsys, "info", "--hf-model", directory)
    assert code == 2 and "holds pickled Python objects" in err and "--trust-checkpoint" in err
    assert not marker.exists()


def test_a_plain_pickled_state_dict_from_hugging_face_loads_without_trust(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertModel(config).eval()
    directory = tmp_path / "hf"
    config.architectures = ["BertModel"]
    config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")  # tensors only: safe to read
    loaded = structprune.load(directory)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def _crafted_v2(tmp_path, arch: dict) -> pathlib.Path:
    """A well-formed (correct checksum) checkpoint whose arch names a callable of the attacker's choosing."""
    meta = json.dumps({"arch": arch, "history": [], "example_input": None, "extra": {}})
    path = tmp_path / "crafted.pt"
    torch.save({"format": "structprune", "version": 2, "meta": meta, "state_dict": {},
                "digest": checkpoint.digest(meta, {})}, path)
    return path


@pytest.mark.parametrize("key, spec", [("import", "subprocess:run"), ("name", "subprocess:run"),
                                       ("import", "structprune.cli:main"), ("name", "structprune.cli:main")])
def test_a_checkpoint_naming_a_function_is_not_called_without_trust(tmp_path, key, spec):
    """Neither as an import path nor in place of a zoo name, and not a function of a library we know either."""
    marker = tmp_path / "pwned"
    kwargs = {"args": ["touch", str(marker)]} if spec.startswith("subprocess") else {
        "argv": ["train", "--model", "lenet5", "--epochs", "1", "--out", str(marker)]}
    path = _crafted_v2(tmp_path, {key: spec, "kwargs": kwargs})
    with pytest.raises(StructPruneError, match="is not an nn.Module class; calling a function that a file names"):
        structprune.load(path)
    assert not marker.exists()


# -- the format: tensors + JSON, custom models rebuilt from their class, old files converted --------

def test_checkpoint_is_tensors_and_json(tmp_path):
    path = tmp_path / "m.pt"
    structprune.save(structprune.models.create("lenet5"), path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "version", "meta", "state_dict", "digest"}
    assert json.loads(raw["meta"])["arch"] == {"name": "lenet5", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())


def _pruned_custom_model():
    from structprune.models.lenet import LeNet5  # a class with no required arguments, importable anywhere

    torch.manual_seed(0)
    model = LeNet5().eval()
    assert not hasattr(model, "structprune_arch")
    calib = [torch.randn(16, 1, 28, 28)]
    return structprune.prune(model, calib, "magnitude", 0.5, progress=False).model


def test_a_custom_model_is_saved_by_its_importable_class_and_reloads_in_a_fresh_process(tmp_path):
    model = _pruned_custom_model()
    path = tmp_path / "custom.pt"
    structprune.save(model, path)
    assert json.loads(torch.load(path, weights_only=True)["meta"])["arch"] == {
        "import": "structprune.models.lenet:LeNet5", "kwargs": {}}
    x = torch.randn(2, 1, 28, 28)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = (f"import torch, structprune; d = torch.load({str(tmp_path / 'io.pt')!r}); "
              f"m = structprune.load({str(path)!r}); assert torch.equal(m(d['x']), d['y'])")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_model_that_cannot_be_rebuilt_is_refused_with_the_fix():
    class Local(nn.Module):  # defined in a function: no fresh process can import it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

    with pytest.raises(StructPruneError, match="defined in a script or a function"):
        checkpoint.pack(Local())
    vgg = structprune.models.vgg.VGG([4, "M"], num_classes=3, in_channels=1)
    with pytest.raises(StructPruneError, match=r"VGG needs cfg; build it with structprune.models.create"):
        checkpoint.pack(vgg)


def test_an_import_spec_model_round_trips(tmp_path):
    model = structprune.models.create("structprune.models.vgg:VGG", cfg=[4, "M", 8], num_classes=3, in_channels=1)
    pruned = structprune.prune(model, [torch.randn(8, 1, 8, 8)], "magnitude", 0.5, progress=False).model
    structprune.save(pruned, tmp_path / "v.pt")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(structprune.load(tmp_path / "v.pt")(x), pruned(x))


def test_an_old_pickled_checkpoint_converts_once_with_trust(tmp_path, capsys):
    model = _pruned_custom_model()
    old = tmp_path / "old.pt"
    torch.save({"format": "structprune", "version": 1, "arch": None, "history": model.structprune_history,
                "example_input": model.structprune_example_input, "extra": {"report": {"a": 1}}, "module": model},
               old)
    code, _, err = run_cli(capsys, "convert", old, tmp_path / "new.pt")
    assert code == 2 and "--trust-checkpoint" in err and not (tmp_path / "new.pt").exists()
    code, out, err = run_cli(capsys, "convert", "--trust-checkpoint", old, tmp_path / "new.pt")
    assert code == 0 and "same weights" in out and "unpickling" in err
    new = structprune.load(tmp_path / "new.pt")  # no trust needed any more
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(new(x), model(x))
    assert checkpoint.read(tmp_path / "new.pt")["extra"] == {"report": {"a": 1}}


def test_convert_names_the_arch_option_for_a_class_that_needs_arguments(tmp_path, capsys):
    vgg = structprune.models.vgg.VGG([4, "M", 8], num_classes=3, in_channels=1).eval()
    old = tmp_path / "old.pt"
    torch.save({"format": "structprune", "version": 1, "arch": None, "history": [], "example_input": None,
                "module": vgg}, old)
    code, _, err = run_cli(capsys, "convert", "--trust-checkpoint", old, tmp_path / "new.pt")
    assert code == 2 and "needs cfg" in err and not (tmp_path / "new.pt").exists()
    code, _, err = run_cli(capsys, "convert", "--trust-checkpoint", old, tmp_path / "new.pt", "--arch",
                           "structprune.models.vgg:VGG", "--arch-kwargs",
                           '{"cfg": [4, "M", 8], "num_classes": 3, "in_channels": 1}')
    assert code == 0, err
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(structprune.load(tmp_path / "new.pt")(x), vgg(x))


def test_a_zoo_checkpoint_of_the_previous_release_still_loads(tmp_path):
    model = structprune.models.create("lenet5")
    old = tmp_path / "old.pt"
    torch.save({"format": "structprune", "version": 1, "arch": model.structprune_arch, "history": [],
                "example_input": None, "extra": {}, "state_dict": model.state_dict()}, old)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(structprune.load(old)(x), model.eval()(x))


# -- damaged files: a clean error or the very same weights, never a traceback ----------------------

def test_fuzz_truncated_and_bit_flipped_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = structprune.models.create("lenet300", input_size=8)
    pruned = structprune.prune(model, [torch.randn(16, 1, 8, 8)], "magnitude", 0.5, progress=False).model
    good = tmp_path / "good.pt"
    structprune.save(pruned, good)
    reference = pruned.state_dict()
    data = good.read_bytes()
    rng = random.Random(0)
    outcomes = {"error": 0, "identical": 0}
    for trial in range(240):
        damaged = bytearray(data)
        if trial % 4 == 0:
            damaged = damaged[:rng.randrange(len(damaged))]
        else:
            for _ in range(rng.choice([1, 1, 2, 8])):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"d{trial}.pt"
        path.write_bytes(bytes(damaged))
        try:
            state = structprune.load(path).state_dict()
        except StructPruneError:
            outcomes["error"] += 1
        else:
            assert state.keys() == reference.keys()
            assert all(torch.equal(state[k], reference[k]) for k in state), f"trial {trial} loaded other weights"
            outcomes["identical"] += 1
        path.unlink()
    assert outcomes["error"] >= 0.98 * 240  # all but a few (bytes the reader never uses): 238 of 240 when written


# -- bad inputs: one line, exit code 2, or a warning that the report keeps -------------------------

def test_empty_checkpoint_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = run_cli(capsys, "info", empty)
    assert code == 2 and err == f"structprune info: error: checkpoint {empty} is not readable (truncated or " \
                                f"corrupted?): EOFError\n"


def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, fmnist_dir, monkeypatch):
    ckpt = tmp_path / "m.pt"
    structprune.save(structprune.models.create("lenet300"), ckpt)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(structprune.cli, "prune", lambda *a, **k: pytest.fail("pruned before checking --out"))
    code, _, err = run_cli(capsys, "prune", ckpt, "--data-dir", fmnist_dir, "--out", blocker / "sub" / "p.pt")
    assert code == 2 and f"--out: {blocker / 'sub' / 'p.pt'}: {blocker} is a file, not a directory" in err


def test_out_equal_to_the_input_is_refused_even_with_force(tmp_path, capsys, fmnist_dir):
    victim = tmp_path / "victim.pt"
    structprune.save(structprune.models.create("lenet300"), victim)
    before = victim.read_bytes()
    for out in (victim, tmp_path / "." / "victim.pt"):
        code, _, err = run_cli(capsys, "prune", victim, "--data-dir", fmnist_dir, "--out", out, "--force")
        assert code == 2 and "is the input" in err and "never overwritten, even with --force" in err
    report_clash = tmp_path / "victim.json"  # --out victim.json would write its report over... victim.json
    code, _, err = run_cli(capsys, "finetune", victim, "--data-dir", fmnist_dir, "--out",
                           tmp_path / "victim.pt", "--force")
    assert code == 2 and "is the input" in err
    assert victim.read_bytes() == before and not report_clash.exists()


def test_taylor_with_labels_beyond_the_classes_is_a_clear_error():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    calib = [(torch.randn(16, 4), torch.full((16,), 5))]
    with pytest.raises(StructPruneError, match=r"labels must be class indices in \[0, 3\) for a model with 3 outputs; "
                                               r"got labels from 5 to 5"):
        structprune.prune(net, calib, "taylor", 0.5, progress=False)


def test_train_for_zero_epochs_is_an_error(tmp_path, capsys, fmnist_dir):
    code, _, err = run_cli(capsys, "train", "--model", "lenet300", "--data-dir", fmnist_dir, "--epochs", "0",
                           "--out", tmp_path / "m.pt")
    assert code == 2 and "--epochs must be at least 1, got 0" in err and not (tmp_path / "m.pt").exists()


def test_tiny_ratio_warns_and_the_report_keeps_the_warning(tmp_path, capsys, fmnist_dir):
    ckpt, out = tmp_path / "m.pt", tmp_path / "p.pt"
    structprune.save(structprune.models.create("lenet300"), ckpt)
    code, _, err = run_cli(capsys, "prune", ckpt, "--ratio", "1e-9", "--data-dir", fmnist_dir, "--limit", "32",
                           "--method", "magnitude", "--out", out, "--no-progress")
    assert code == 0 and "ratio 1e-09 rounds to no channel in 2 group(s)" in err
    assert any("rounds to no channel" in w for w in json.loads(out.with_suffix(".json").read_text())["warnings"])


def test_every_group_ignored_warns_that_nothing_was_pruned():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"every prunable group is ignored \(0\); nothing was pruned"):
        result = structprune.prune(net, [torch.randn(8, 4)], "magnitude", 0.5, ignored_layers=["0"], progress=False)
    assert result.warnings == ["structprune: every prunable group is ignored (0); nothing was pruned"]


def test_a_model_with_no_prunable_group_warns():
    net = nn.Sequential(nn.ConvTranspose2d(2, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3))
    with pytest.warns(UserWarning, match=r"no prunable group.*layers of type ConvTranspose2d are not pruned"):
        structprune.prune(net, [torch.randn(8, 2, 10, 10)], "magnitude", 0.5, progress=False)


def test_cascade_warns_with_the_users_target(tmp_path, capsys, fmnist_dir):
    from structprune import schedule

    torch.manual_seed(0)
    net = structprune.models.create("lenet5")
    with pytest.warns(UserWarning) as caught:
        _, _, results = schedule.run(net, [torch.randn(16, 1, 28, 28)], "magnitude",
                                     structprune.Target(0.02), schedule="cascade", steps=2, progress=False)
    messages = [str(w.message) for w in caught if "could not be met" in str(w.message)]
    assert len(messages) == 1 and "the flops target 0.02 could not be met" in messages[0]
    assert results[-1].warnings == messages


def test_compare_keeps_finished_runs_on_interrupt_and_resumes(tmp_path, capsys, fmnist_dir, monkeypatch):
    ckpt, out_dir = tmp_path / "m.pt", tmp_path / "cmp"
    structprune.save(structprune.models.create("lenet300"), ckpt)
    args = ["compare", ckpt, "--methods", "magnitude,random", "--targets", "0.7,0.5", "--data-dir", fmnist_dir,
            "--limit", "32", "--out-dir", out_dir, "--no-progress"]
    from structprune.cli import compare

    real_prune, calls = compare.prune, []

    def prune_then_interrupt(*a, **k):
        calls.append(a[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_prune(*a, **k)

    monkeypatch.setattr(compare, "prune", prune_then_interrupt)
    code, _, err = run_cli(capsys, *args)
    assert code == 130
    partial = json.loads((out_dir / "compare.json").read_text())
    assert not partial["complete"] and [(r["method"], r["target"]) for r in partial["rows"]] == [
        ("magnitude", 0.7), ("magnitude", 0.5)]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "pass --resume" in err
    code, _, err = run_cli(capsys, *args, "--limit", "16", "--resume")
    assert code == 2 and "other options (limit)" in err
    calls.clear()
    monkeypatch.setattr(compare, "prune", real_prune)
    code, out, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    final = json.loads((out_dir / "compare.json").read_text())
    assert final["complete"] and [(r["method"], r["target"]) for r in final["rows"]] == [
        ("magnitude", 0.7), ("magnitude", 0.5), ("random", 0.7), ("random", 0.5)]
    assert final["rows"][:2] == partial["rows"]


def test_an_older_hugging_face_checkpoint_with_a_persistent_position_ids_buffer_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=20)
    config.architectures = ["BertModel"]
    model = transformers.BertModel(config).eval()
    directory = tmp_path / "hf"
    config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(20)[None]  # how older transformers saved BERT
    save_file(state, directory / "model.safetensors")
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(structprune.load(directory)(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_hugging_face_config_naming_a_function_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=16))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["pipeline"]  # a transformers function, not a model class
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StructPruneError, match="no model class 'pipeline'"):
        structprune.load(tmp_path / "m")
