"""The package's metadata: what `pip install structprune` asks of the user's environment."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

import structprune

PYPROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (req,) = [r for r in reqs if r.name == name]
    return req


def test_torch_is_a_range_that_keeps_the_users_torch():
    torch = _requirement("torch")
    for version in ("2.6.0", "2.7.1", "2.13.0", "2.14.0"):
        assert torch.specifier.contains(Version(version)), version
    assert not torch.specifier.contains(Version("2.5.1"))  # weights_only loading was not safe before 2.6


def test_version_is_the_same_everywhere():
    assert PYPROJECT["project"]["version"] == structprune.__version__


def test_the_package_declares_its_type_hints():
    assert (Path(structprune.__file__).parent / "py.typed").exists()
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]
