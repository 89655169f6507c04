"""Export to ONNX and TorchScript: the written file computes what the pruned PyTorch model computes, with a
dynamic batch (and sequence) axis; a file that does not is refused; eval reads exported files back."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

import structprune
from conftest import calibration, make_zoo_model
from structprune.cli import main
from structprune.exporter import ExportedModel, export

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory):
    model, shape = make_zoo_model("resnet20")
    result = structprune.prune(model, calibration(shape), "ispasp", 0.5, example_inputs=torch.zeros(1, *shape),
                               progress=False)
    path = tmp_path_factory.mktemp("export") / "resnet20-ispasp.pt"
    structprune.save(result, path)
    return path, shape


@pytest.mark.parametrize("suffix", [".onnx", ".ts"])
def test_exported_pruned_cnn_matches_pytorch_at_any_batch_size(pruned_resnet, tmp_path, suffix):
    path, shape = pruned_resnet
    out = tmp_path / f"model{suffix}"
    result = export(path, out)
    assert result.format == ("onnx" if suffix == ".onnx" else "torchscript")
    assert result.checked_with == ("onnxruntime" if suffix == ".onnx" else "torchscript")
    assert result.max_abs_diff <= 1e-4 and out.is_file()
    model = structprune.load(path)
    exported = ExportedModel(out, trust_checkpoint=True)
    assert exported.metadata["macs"] == structprune.measure.count(model, torch.zeros(1, *shape))["macs"]
    for batch in (1, 7):  # neither is the batch of 2 it was exported with
        x = torch.randn(batch, *shape)
        assert torch.allclose(exported(x), model(x), atol=1e-4)


def test_onnx_opset_is_recorded_and_can_be_chosen(pruned_resnet, tmp_path):
    onnx = pytest.importorskip("onnx")
    result = export(pruned_resnet[0], tmp_path / "a.onnx", opset=18)
    assert result.opset == 18
    assert [o.version for o in onnx.load(str(tmp_path / "a.onnx")).opset_import if o.domain == ""] == [18]


def test_pruned_bert_exports_with_dynamic_batch_and_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    calib = [{"input_ids": torch.randint(0, 40, (16, 10)), "attention_mask": torch.ones(16, 10, dtype=torch.long)}]
    result = structprune.prune(model, calib, "ispasp", {"encoder.layer.0.*": 0.5, "*": 0.75}, progress=False)
    heads = [layer.attention.self.num_attention_heads for layer in result.model.encoder.layer]
    assert heads == [2, 3]  # uneven: the export must follow every layer's own head count
    for suffix in (".onnx", ".ts"):
        exported = export(result, tmp_path / f"bert{suffix}")
        assert exported.inputs == ["input_ids", "attention_mask"]
        assert exported.outputs[0] == "last_hidden_state" and exported.max_abs_diff <= 1e-4
    run = ExportedModel(tmp_path / "bert.onnx")
    ids, mask = torch.randint(0, 40, (5, 23)), torch.ones(5, 23, dtype=torch.long)
    mask[2, 11:] = 0
    hidden = run(input_ids=ids, attention_mask=mask)[0]
    expected = result.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (5, 23, 32) and torch.allclose(hidden, expected, atol=1e-4)


class _Drifting(nn.Module):
    """Different outputs on every call: what an export that does not reproduce the model looks like."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) * self.calls


def test_an_export_that_differs_from_pytorch_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "drift.ts"
    with pytest.raises(structprune.StructPruneError, match="differ from PyTorch's"):
        export(_Drifting(), out, example_inputs=torch.zeros(1, 4))
    assert list(tmp_path.iterdir()) == []


def test_export_bad_input_is_one_clear_error(pruned_resnet, tmp_path):
    path = pruned_resnet[0]
    (tmp_path / "taken.onnx").write_text("mine")
    cases = [
        (lambda: export(path, tmp_path / "taken.onnx"), "already exists"),
        (lambda: export(path, tmp_path / "x.onnx", format="tflite"), "format must be one of"),
        (lambda: export(nn.Linear(3, 2), tmp_path / "y.onnx"), "pass example_inputs"),
        (lambda: export(tmp_path / "missing.pt", tmp_path / "z.onnx"), "does not exist"),
        (lambda: export(path, tmp_path / "w.onnx", atol=0), "atol must be > 0"),
        (lambda: ExportedModel(tmp_path / "taken.onnx"), "ONNX Runtime cannot load it"),
    ]
    for call, message in cases:
        with pytest.raises(structprune.StructPruneError, match=message):
            call()
    assert (tmp_path / "taken.onnx").read_text() == "mine"


def test_without_onnx_packages_the_error_names_the_extra(pruned_resnet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(structprune.StructPruneError, match=r"structprune\[onnx\]"):
        export(pruned_resnet[0], tmp_path / "a.onnx")


def test_without_onnxruntime_the_export_warns_that_it_was_not_checked(pruned_resnet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.warns(UserWarning, match="not compared"):
        result = export(pruned_resnet[0], tmp_path / "a.onnx")
    assert result.checked_with is None and result.max_abs_diff is None and (tmp_path / "a.onnx").is_file()


def test_cli_export_then_eval_reports_exported_latency_beside_pytorch(pruned_resnet, tmp_path, capsys, fmnist_dir):
    path, _ = pruned_resnet
    # the fixture model is 16×16; eval reads 28×28 Fashion-MNIST: export a LeNet-5 checkpoint for the CLI run
    dense = tmp_path / "lenet5.pt"
    assert main(["train", "--model", "lenet5", "--data-dir", str(fmnist_dir), "--epochs", "1", "--out", str(dense),
                 "--quiet"]) == 0
    capsys.readouterr()
    onnx_file, ts_file = tmp_path / "lenet5.onnx", tmp_path / "lenet5.ts"
    assert main(["export", str(dense), "--out", str(onnx_file)]) == 0
    assert main(["export", str(dense), "--out", str(ts_file)]) == 0
    out = capsys.readouterr().out
    assert "ONNX opset" in out and "checked with onnxruntime" in out
    assert "latency (ms, median ± IQR): PyTorch" in out and " at 64" in out
    report = json.loads((tmp_path / "lenet5.onnx.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["latency_onnxruntime_batch1"]["median_ms"] > 0

    assert main(["eval", str(dense), str(onnx_file), "--data-dir", str(fmnist_dir), "--json",
                 str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["pytorch", "onnxruntime"]
    assert rows[1]["accuracy"] == pytest.approx(rows[0]["accuracy"], abs=3.2)  # of 32 images, one may flip at most
    assert rows[1]["macs"] == rows[0]["macs"] and rows[1]["latency_median_ms_batch1"] > 0

    assert main(["eval", str(ts_file), "--data-dir", str(fmnist_dir)]) == 2  # a program: only when trusted
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert main(["eval", str(ts_file), "--data-dir", str(fmnist_dir), "--trust-checkpoint"]) == 0
    assert "| torchscript |" in capsys.readouterr().out

    assert main(["export", str(dense), "--out", str(onnx_file)]) == 2  # exists
    assert main(["export", str(dense), "--out", str(dense)]) == 2  # the input, even with --force
    assert main(["export", str(dense), "--out", str(dense), "--force"]) == 2
    assert structprune.load(dense) is not None


def test_export_runs_the_model_in_eval_mode_and_gives_its_mode_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    result = export(model, tmp_path / "m.onnx", example_inputs=torch.zeros(1, 6))
    assert model.training and result.max_abs_diff <= 1e-4  # dropout and batch statistics would not match
    x = torch.randn(5, 6)
    assert torch.allclose(ExportedModel(tmp_path / "m.onnx")(x), model.eval()(x), atol=1e-5)


def test_onnx_export_of_a_pruned_cnn_with_unaligned_widths_says_how_to_prune_for_onnx_runtime(tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setitem(structprune.allocate.HARDWARE_MULTIPLE, "cpu", 8)  # an AVX2 CPU's, whatever this one runs
    model, shape = make_zoo_model("vgg16")
    calib = calibration(shape)
    odd = structprune.prune(model, calib, "magnitude", 0.3, refit=False, progress=False)
    with pytest.warns(UserWarning, match="round_to=8"):
        export(odd, tmp_path / "odd.onnx")
    aligned = structprune.prune(model, calib, "magnitude", 0.3, refit=False, round_to=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the dense model nor the aligned one is warned about
        export(aligned, tmp_path / "aligned.onnx")
        export(model, tmp_path / "dense.onnx", example_inputs=torch.zeros(1, *shape))


def test_onnx_export_warns_only_where_unaligned_widths_hold_a_share_of_the_macs(tmp_path, monkeypatch):
    monkeypatch.setitem(structprune.allocate.HARDWARE_MULTIPLE, "cpu", 8)  # an AVX2 CPU's, whatever this one runs
    torch.manual_seed(0)
    model = structprune.models.create("resnet20", num_classes=10, in_channels=1).eval()
    calib = calibration((1, 28, 28), samples=32)
    defaults = structprune.prune(model, calib, "magnitude", structprune.Target(0.5), refit=False, scope="inner",
                                 progress=False)
    narrow = [m.out_channels for m in defaults.model.modules() if isinstance(m, nn.Conv2d) and m.out_channels % 8]
    assert narrow  # a 16-channel group left as it falls by the default rounding: one convolution, a few % of MACs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(defaults, tmp_path / "defaults.onnx")
    fallen = structprune.prune(model, calib, "magnitude", structprune.Target(0.5), refit=False, round_to=None,
                               scope="inner", progress=False)
    with pytest.warns(UserWarning, match=r"convolutions \(1[0-9]% of their MACs\).*round_to=8"):
        export(fallen, tmp_path / "fallen.onnx")
