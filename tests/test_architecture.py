"""The architecture of record (docs/architecture.md) holds for the code: every module has its row and floor, no
import runs up a floor or closes a circle, no package module is imported inside a function, files and functions
stay small, and no six lines stand twice in src/."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "structprune"
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _floors() -> dict[str, int]:
    rows = re.findall(r"^\| `(structprune[\w.]*)` \| (\d+) \|", DOC.read_text(), flags=re.M)
    assert rows, "docs/architecture.md has no module table"
    return {name: int(floor) for name, floor in rows}


def _imports(name: str, path: Path) -> tuple[set[str], list[str]]:
    """The package modules ``name`` imports, and those it imports inside a function (as 'line: module')."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets, local = set(), []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports the submodule x, not the package
                found.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        found = [f for f in found if f in MODULES and f != name]
        targets.update(found)
        if found and id(node) in inside:
            local += [f"{node.lineno}: {f}" for f in found]
    return targets, local


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_row_in_the_architecture_document_and_every_row_a_module():
    floors = _floors()
    assert sorted(set(MODULES) - set(floors)) == [], "add these modules to docs/architecture.md"
    assert sorted(set(floors) - set(MODULES)) == [], "docs/architecture.md names modules that do not exist"


def test_no_import_runs_up_a_floor():
    floors = _floors()
    upward = [f"{name} (floor {floors[name]}) imports {target} (floor {floors[target]})"
              for name, (targets, _) in GRAPH.items() for target in sorted(targets) if floors[target] > floors[name]]
    assert upward == []


def test_the_import_graph_has_no_circle():
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name][0]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_package_module_is_imported_inside_a_function():
    assert {name: local for name, (_, local) in GRAPH.items() if local} == {}


def test_files_and_functions_stay_small():
    long_files = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
                  if len(path.read_text().splitlines()) > 600}
    long_functions = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > (60 if node.name == "_prune" else 80):
                    long_functions[f"{name}.{node.name}"] = length
    assert long_files == {} and long_functions == {}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """The lines a duplicate scan compares: not blank, not a comment, an import or lone punctuation; white space
    folded."""
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = " ".join(line.split())
        if not text or text.startswith(("#", "import ", "from ")) or re.fullmatch(r"[()\[\]{},:]*", text):
            continue
        kept.append((number, text))
    return kept


@pytest.mark.parametrize("window", [6])
def test_no_six_identical_lines_stand_twice_in_src(window):
    seen: dict[tuple[str, ...], str] = {}
    twice = []
    for name, path in MODULES.items():
        lines = _code_lines(path)
        for i in range(len(lines) - window + 1):
            run = tuple(text for _, text in lines[i:i + window])
            place = f"{name}:{lines[i][0]}"
            if run in seen and not seen[run].startswith(f"{name}:"):
                twice.append(f"{seen[run]} ~ {place}")
            seen.setdefault(run, place)
    assert twice == []


def test_the_duplicate_scan_finds_a_planted_copy(tmp_path):
    """The scan above can fail: the same six lines in two files are found."""
    body = "\n".join(f"value_{i} = compute({i}, factor={i * 3})" for i in range(6)) + "\n"
    (tmp_path / "a.py").write_text(body)
    (tmp_path / "b.py").write_text("x = 1\n" + body)
    runs = [tuple(text for _, text in _code_lines(tmp_path / f)) for f in ("a.py", "b.py")]
    assert Counter(r[i:i + 6] for r in runs for i in range(len(r) - 5))[runs[0]] == 2


def test_the_readme_links_the_architecture():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
