"""Tiny models and data shared by the tests: everything here runs in well under a second on a CPU.

Every test process (and every process a test starts) runs torch on one thread: on a machine with another job
beside the suite, more threads than cores made single tests 15–100× slower. With STRUCTPRUNE_NO_SKIPS=1 (make test,
and so CI) a run in which any test was skipped fails: every optional dependency of the tests is a dev dependency.
"""

from __future__ import annotations

import copy
import gzip
import os
import struct
import textwrap
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # before torch starts its pools

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from structprune import models  # noqa: E402

torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    """With STRUCTPRUNE_NO_SKIPS=1, a skipped test fails the run (-rs lists the reasons)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("STRUCTPRUNE_NO_SKIPS") == "1" and skipped and session.exitstatus == 0:
        reporter.write_sep("=", f"STRUCTPRUNE_NO_SKIPS=1: {len(skipped)} test(s) skipped; every test must run "
                                f"here (install the dev extras: make install)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

# (zoo name, options, input shape): widths shrunk so every method prunes each model in about a second
ZOO = {
    "lenet300": ({}, (1, 28, 28)),
    "lenet5": ({}, (1, 28, 28)),
    "vgg16": ({"width_mult": 0.125}, (1, 16, 16)),
    "resnet20": ({"width_mult": 0.5}, (1, 16, 16)),
    "resnet56": ({"width_mult": 0.25}, (1, 16, 16)),
    "mobilenetv2": ({"width_mult": 0.25}, (1, 16, 16)),
}


def make_zoo_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    options, shape = ZOO[name]
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=shape[0], **options)
    _randomise_batchnorm(model)
    return model.eval(), shape


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give BatchNorms non-trivial statistics, as a trained network has, so BN handling is exercised."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))


def prune_keeping_everything(model: nn.Module, calib: list, method: str, example_inputs=None) -> nn.Module:
    """A copy of ``model`` taken through every stage of a prune with every channel kept: each group captured on
    ``calib``, selected (all channels), refitted, its consumer weights written and its removal applied with every
    index (prune() itself skips a group that keeps all of its channels)."""
    from structprune import methods
    from structprune.capture import capture
    from structprune.graph import build_graph
    from structprune.refit import refit

    model = copy.deepcopy(model).eval()
    inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calib]
    graph = build_graph(model, example_inputs if example_inputs is not None else inputs[0])
    chooser = methods.get(method)
    for group in graph.groups():
        view = capture(model, group, inputs, sensitivity_samples=len(inputs) * 64)
        selection = refit(view, chooser.select(view, group.channels))
        assert selection.keep_idx.tolist() == list(range(group.channels))
        graph.apply(group, selection.keep_idx, selection.consumer_weights, selection.consumer_biases)
    return model


def calibration(shape, samples: int = 48, batch: int = 16, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


# -- tiny transformers, built from a config (transformers is a dev dependency: `make install` has it) -------------

BERT_WORDS = "the a cat dog sat on mat ran fast slow big small red blue and or was is very old new house tree".split()
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]


def tiny_bert(seed: int = 0, layers: int = 2, heads: int = 4, hidden: int = 32, inter: int = 64):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


WIDTH, HEADS, INNER = 32, 4, 64
TEXT = dict(vocab_size=50, max_position_embeddings=32)
#: every transformers family structprune describes (models/hf.py), as a model class of transformers
FAMILY_MODELS = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel",
                 "distilbert": "DistilBertModel", "vit": "ViTModel", "llama": "LlamaModel", "bart": "BartModel",
                 "gpt2": "GPT2Model"}


def family_config(family: str):
    import transformers as t

    return {
        "bert": lambda: t.BertConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                                     intermediate_size=INNER, **TEXT),
        "roberta": lambda: t.RobertaConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                                           intermediate_size=INNER, pad_token_id=1, **TEXT),
        "albert": lambda: t.AlbertConfig(embedding_size=8, hidden_size=WIDTH, num_hidden_layers=2,
                                         num_attention_heads=HEADS, intermediate_size=INNER, **TEXT),
        "distilbert": lambda: t.DistilBertConfig(dim=WIDTH, n_layers=2, n_heads=HEADS, hidden_dim=INNER, **TEXT),
        "vit": lambda: t.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
                                   num_attention_heads=HEADS, intermediate_size=INNER),
        "llama": lambda: t.LlamaConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                                       num_key_value_heads=2, intermediate_size=INNER, **TEXT),
        "bart": lambda: t.BartConfig(d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                                     decoder_attention_heads=HEADS, encoder_ffn_dim=INNER, decoder_ffn_dim=INNER,
                                     **TEXT),
        "gpt2": lambda: t.GPT2Config(vocab_size=50, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=HEADS,
                                     n_inner=INNER, bos_token_id=0, eos_token_id=0),
    }[family]()


def build_family(family: str):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, FAMILY_MODELS[family])(family_config(family)).eval()


def family_inputs(family: str, n: int = 4, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=gen)}
    return {"input_ids": torch.randint(2, 50, (n, 9), generator=gen)}


def write_idx(path, array_bytes: bytes, dims: list[int]) -> None:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array_bytes)


@pytest.fixture
def fmnist_dir(tmp_path):
    """A 64-image Fashion-MNIST look-alike in the IDX format, so the CLI's real reader is exercised."""
    root = tmp_path / "fmnist"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("t10k", 32)):
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        images = (torch.rand(n, 28, 28, generator=gen) * 60).to(torch.uint8)
        images += (labels * 19).to(torch.uint8)[:, None, None]  # class-dependent brightness: learnable
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.numpy().tobytes(), [n, 28, 28])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.numpy().tobytes(), [n])
    return root


# A newcomer's own module, in pieces the tests put together: a residual CNN of theirs, a factory function and a
# dataset function (tests/test_docs.py writes all three as the guides' `mynets.py`).
USER_IMPORTS = "import torch\nfrom torch import nn\n"
USER_RESNET = '''

class TinyResNet(nn.Module):
    """A small residual CNN for 3-channel images."""

    def __init__(self, classes: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))
'''
USER_FACTORY = '''

def build(width=8, classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, classes))


def dataset(split="train"):
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(40, 12, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
'''

# Local stand-ins for the optional model libraries (neither torchvision nor timm installs here), with the same
# registry API structprune calls, and a user's own package: a factory and a dataset function.
STAND_INS = {
    # torchvision's registry API: list_models() and get_model(name, weights=None, **kwargs)
    "torchvision/__init__.py": "from . import models\n",
    "torchvision/models/__init__.py": """
        from torch import nn

        def _tiny(num_classes=1000):
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

        _MODELS = {"tinynet": _tiny, "resnet18": _tiny}

        def list_models():
            return sorted(_MODELS)

        def get_model(name, weights=None, **kwargs):
            assert weights is None, "structprune never asks for downloaded weights"
            return _MODELS[name](**kwargs)
        """,
    # timm's: is_model(name) and create_model(name, pretrained=False, num_classes=..., in_chans=...), and the
    # attention classes Torch-Pruning's MACs counter looks up when it finds timm installed
    "timm/models/__init__.py": "from . import swin_transformer, vision_transformer\n",
    "timm/models/vision_transformer.py": "from torch import nn\n\n\nclass Attention(nn.Module):\n    pass\n",
    "timm/models/swin_transformer.py": "from torch import nn\n\n\nclass WindowAttention(nn.Module):\n    pass\n",
    "timm/__init__.py": """
        from torch import nn

        from . import models

        def is_model(name):
            return name in ("tinymlp", "convnext_tiny")

        def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
            assert not pretrained
            return nn.Sequential(nn.Conv2d(in_chans, 4, 1), nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, num_classes))
        """,
    # a user's own module: a factory function and a dataset function
    "mynets.py": USER_IMPORTS + USER_FACTORY,
}
STAND_IN_MODULES = ("torchvision", "torchvision.models", "timm", "timm.models", "timm.models.vision_transformer",
                    "timm.models.swin_transformer", "mynets")


def write_stand_ins(root: Path) -> None:
    for name, code in STAND_INS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))


def text_model_dir(root, name: str, model, sentences: int = 40, seed: int = 2):
    """``root/name``: ``model`` saved as a Hugging Face directory with a word-level tokenizer of BERT_VOCAB, and
    ``root/text.txt``: ``sentences`` random sentences of nine BERT_WORDS. Returns ``root``."""
    import transformers

    from structprune.models import hf

    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)})
    hf.save_pretrained(model, root / name, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(seed)
    (root / "text.txt").write_text("\n".join(
        " ".join(BERT_WORDS[int(i)] for i in torch.randint(0, len(BERT_WORDS), (9,), generator=gen))
        for _ in range(sentences)) + "\n")
    return root
