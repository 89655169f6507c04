"""Models and data from anywhere: torchvision/timm registries (through local stand-ins: neither installs here),
your own module, trained weights from a file; image folders, tensor files and module:function datasets."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

import structprune
from conftest import STAND_IN_MODULES, write_stand_ins
from structprune import data, models
from structprune.cli import main
from structprune.errors import StructPruneError


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    write_stand_ins(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in STAND_IN_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path / "site"
    for name in STAND_IN_MODULES:
        sys.modules.pop(name, None)


def test_registry_models_are_built_by_name_and_rebuilt_from_a_checkpoint(stand_ins, tmp_path):
    net = models.create("torchvision:tinynet", num_classes=5)
    assert net.structprune_arch == {"name": "torchvision:tinynet", "kwargs": {"num_classes": 5}}
    x = torch.randn(16, 3, 12, 12)
    result = structprune.prune(net, [x], "ispasp", 0.5, progress=False)
    path = structprune.save(result, tmp_path / "tiny.pt")
    reloaded = structprune.load(path)  # no trust needed: a registry builds models by name only
    assert torch.allclose(reloaded(x), result.model(x), atol=1e-6)
    timm_net = models.create("timm:tinymlp", num_classes=4, in_channels=1)
    assert timm_net(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize("spec, message", [
    ("torchvision:nonesuch", "torchvision has no model 'nonesuch'"),
    ("timm:nonesuch", "timm has no model 'nonesuch'"),
])
def test_unknown_registry_models_are_one_clear_error(stand_ins, spec, message):
    with pytest.raises(StructPruneError, match=message):
        models.create(spec)


def test_registry_options_that_would_download_weights_are_refused(stand_ins):
    with pytest.raises(StructPruneError, match="--weights FILE"):
        models.create("torchvision:tinynet", weights="DEFAULT")
    with pytest.raises(StructPruneError, match="take 3 input channels"):
        models.create("torchvision:tinynet", in_channels=1)


def test_a_missing_library_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # "not installed"
    with pytest.raises(StructPruneError, match=r"pip install 'structprune\[timm\]'"):
        models.create("timm:convnext_tiny")


def test_weights_load_from_state_dicts_in_the_usual_wrappings(tmp_path):
    from safetensors.torch import save_file

    source, target = models.create("lenet300"), models.create("lenet300")
    state = source.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    save_file(state, tmp_path / "w.safetensors")
    x = torch.randn(2, 1, 28, 28)
    for name in ("ddp.pt", "w.safetensors"):
        models.load_weights(target, tmp_path / name)
        assert torch.equal(target(x), source(x))
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    with pytest.raises(StructPruneError, match="do not fit the model"):
        models.load_weights(target, tmp_path / "wrong.pt")


def test_cli_prunes_a_registry_model_with_its_weights_on_a_tensor_file(stand_ins, tmp_path, capsys):
    net = models.create("torchvision:tinynet", num_classes=3)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    gen = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "data.npz", x=torch.randn(50, 3, 12, 12, generator=gen).numpy(),
             y=torch.randint(0, 3, (50,), generator=gen).numpy())
    code = main(["prune", "--model", "torchvision:tinynet", "--model-kwargs", '{"num_classes": 3}',
                 "--weights", str(tmp_path / "weights.pt"), "--data", str(tmp_path / "data.npz"),
                 "--method", "pfp", "--ratio", "0.5", "--out", str(tmp_path / "out.pt"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["model"] == "torchvision:tinynet" and report["weights"] == str(tmp_path / "weights.pt")
    assert 0 <= report["accuracy_after"] <= 100
    assert structprune.load(tmp_path / "out.pt")[0].out_channels == 4


def test_cli_prunes_your_own_factory_on_your_own_dataset_function(stand_ins, tmp_path, capsys):
    code = main(["prune", "--model", "mynets:build", "--model-kwargs", '{"width": 8}', "--data", "mynets:dataset",
                 "--ratio", "0.5", "--out", str(tmp_path / "own.pt"), "--no-progress", "--trust-checkpoint"])
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "without --weights prunes randomly initialised weights" in err
    # a factory function is only rebuilt from a file with trust: the file names what gets called
    assert structprune.load(tmp_path / "own.pt", trust_checkpoint=True)[1].out_features == 4


def _image_folder(root, classes=("cat", "dog"), per_class=5, size=(20, 14)):
    from PIL import Image

    gen = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = gen.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_an_image_folder_is_resized_normalised_and_split(tmp_path):
    _image_folder(tmp_path / "imgs")
    source = data.source(f"imagefolder:{tmp_path / 'imgs'}", image_size=16, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25))
    assert source.classes == 2 and source.shape == (3, 16, 16)
    train, test = source.load("train"), source.load("test")
    assert len(train) == 8 and len(test) == 2  # a seeded 80/20 split of the 10 images
    x, label = train[0]
    assert x.shape == (3, 16, 16) and label in (0, 1) and -2.01 <= float(x.min()) and float(x.max()) <= 2.01
    _image_folder(tmp_path / "split" / "train")
    _image_folder(tmp_path / "split" / "val", per_class=2)
    split = data.source(f"imagefolder:{tmp_path / 'split'}", image_size=8)
    assert len(split.load("train")) == 10 and len(split.load("test")) == 4


def test_cli_prunes_on_an_image_folder(stand_ins, tmp_path, capsys):
    _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=6)
    code = main(["prune", "--model", "torchvision:tinynet", "--model-kwargs", '{"num_classes": 3}',
                 "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "12", "--ratio", "0.5",
                 "--out", str(tmp_path / "out.pt"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["data"] == f"imagefolder:{tmp_path / 'imgs'}"


@pytest.mark.parametrize("name, payload, sizes", [
    ("d.pt", lambda x, y: {"x_train": x[:30], "y_train": y[:30], "x_test": x[30:], "y_test": y[30:]}, (30, 10)),
    ("d.pt", lambda x, y: (x, y), (32, 8)),  # no splits given: a seeded 80/20 split
    ("d.npz", lambda x, y: {"x": x.numpy(), "y": y.numpy()}, (32, 8)),
    ("d.npy", lambda x, y: x.numpy(), (32, 8)),
])
def test_tensor_files(tmp_path, name, payload, sizes):
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    value = payload(x, y)
    if name.endswith(".npz"):
        np.savez(tmp_path / name, **value)
    elif name.endswith(".npy"):
        np.save(tmp_path / name, value)
    else:
        torch.save(value, tmp_path / name)
    source = data.source(str(tmp_path / name))
    assert source.shape == (1, 4, 4)
    assert (len(source.load("train")), len(source.load("test"))) == sizes
    assert source.classes == (None if name.endswith(".npy") else int(y.max()) + 1)


@pytest.mark.parametrize("spec, message", [
    ("imagefolder:/nonexistent", "no such directory"),
    ("/nonexistent.npz", "no such file"),
    ("nonesuch_module_xyz:data", "cannot import it"),
    ("cifar", "not a dataset name"),
])
def test_bad_data_specs_are_one_clear_error(spec, message):
    with pytest.raises(StructPruneError, match=message):
        data.source(spec)


def test_a_pickled_tensor_file_is_refused(tmp_path):
    torch.save({"x": torch.zeros(3, 2), "y": nn.Linear(2, 2)}, tmp_path / "evil.pt")
    with pytest.raises(StructPruneError, match="not readable as tensors"):
        data.source(str(tmp_path / "evil.pt"))


def test_json_lines_text_for_language_models(tmp_path):
    from structprune.data import text

    lines = ['{"text": "the first sentence has exactly enough words in it"}', "",
             '"a bare string works as well when it is long enough"']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    assert text.read(tmp_path / "t.jsonl") == ["the first sentence has exactly enough words in it",
                                               "a bare string works as well when it is long enough"]
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(StructPruneError, match="line 1 is neither a string"):
        text.read(tmp_path / "bad.jsonl")


def test_unlabelled_data_calibrates_but_accuracy_asks_for_labels(tmp_path, capsys):
    np.save(tmp_path / "x.npy", torch.randn(40, 1, 28, 28).numpy())
    net = models.create("lenet300")
    structprune.save(net, tmp_path / "net.pt")
    args = ["prune", str(tmp_path / "net.pt"), "--data", str(tmp_path / "x.npy"), "--ratio", "0.5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.pt")]) == 2
    assert "has no labels, which measuring accuracy needs (or pass --no-eval)" in capsys.readouterr().err
    assert main([*args, "--no-eval", "--out", str(tmp_path / "b.pt")]) == 0
