"""The package's metadata: what `pip install structprune` asks of the user's environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
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


def test_urls_are_declared_and_reach_the_wheel(venv):
    urls = PYPROJECT["project"]["urls"]
    assert urls and all(u.startswith("https://") for u in urls.values())
    (wheel,) = (venv / "wheels").glob("structprune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"structprune-{structprune.__version__}.dist-info/METADATA").decode()
        assert "structprune/py.typed" in archive.namelist()
    assert all(f"Project-URL: {label}, {url}" in metadata for label, url in urls.items())


def test_the_package_declares_its_type_hints():
    assert (Path(structprune.__file__).parent / "py.typed").exists()
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


ROOT = Path(__file__).parent.parent


def _stub_distribution(site: Path, name: str, version: str, requires: list[str]) -> None:
    """An installed distribution as pip sees one: a .dist-info with METADATA (no code)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A clean venv (pip only used) made from this interpreter's base Python, and a wheel of structprune built
    from a copy of the sources (setuptools of this environment; nothing written into the repository)."""
    base = tmp_path_factory.mktemp("pip")
    subprocess.run([sys.executable, "-m", "venv", str(base / "env")], check=True, capture_output=True)
    source = base / "src-copy"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(base / "wheels"), str(source)], check=True, capture_output=True, env=_env())
    return base


def _env() -> dict:
    """The environment without this machine's pip configuration (its wheel directory holds a torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _dry_run(base: Path, torch_version: str) -> subprocess.CompletedProcess:
    """``pip install --dry-run structprune`` (the wheel) into a venv holding torch ``torch_version`` and the other
    dependencies at the versions installed here (torch-pruning with its real requirements), offline."""
    python = str(base / "env" / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for info in site.glob("*.dist-info"):
        if info.name.split("-")[0].lower() in ("torch", "torch_pruning", "numpy", "tqdm", "matplotlib"):
            shutil.rmtree(info)
    _stub_distribution(site, "torch", torch_version, [])
    _stub_distribution(site, "torch-pruning", importlib.metadata.version("torch-pruning"),
                       importlib.metadata.requires("torch-pruning") or [])
    for name in ("numpy", "tqdm", "matplotlib"):
        _stub_distribution(site, name, importlib.metadata.version(name), [])
    report = base / "report.json"
    done = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links",
                           str(base / "wheels"), "--report", str(report), "--quiet", "structprune"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    done.installs = ([item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
                     if done.returncode == 0 else None)
    return done


def test_pip_install_keeps_the_users_torch(venv):
    done = _dry_run(venv, "2.7.0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.installs == ["structprune"]  # torch 2.7.0 (and everything else) stays as it is


def test_a_torch_below_the_floor_would_be_replaced(venv):
    done = _dry_run(venv, "2.5.1")  # the control: the same check fails when the floor excludes the user's torch
    assert done.returncode != 0 and "torch>=2.6" in done.stderr
