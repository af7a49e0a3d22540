"""The package's import layers: folders import one way, no module over 600 lines.

The import graph is read with ast (nothing is imported): every `import` and `from ... import` of a convert module,
those under `if TYPE_CHECKING:` included (a type a module needs is a dependency of its design). A folder of
convert/ stands for every module in it; a module directly in convert/ is its own node. The order below is the
pipeline's: a folder may import only from folders before it. A new folder must be placed in LAYERS, and an import
that runs back up fails here naming both modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "convert"
# Lowest first. The root package (convert/__init__.py, the version) is below everything.
LAYERS = (
    "convert",
    "common",
    "fileio",
    "integrity",
    "model",
    "tokenizer",
    "containers",
    "planning",
    "run",
    "verify",
    "sample",
    "cli",
    "__main__",
)
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["convert", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = base[: len(base) - node.level + 1]
            module = ".".join([*anchor, node.module or ""]) if node.level else node.module
            targets = [module or ""] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "convert"


def test_every_folder_has_a_layer() -> None:
    unplaced = sorted({_layer(m) for m in _modules()} - set(LAYERS))
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_imports_run_one_way() -> None:
    known = _modules()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for name, path in known.items():
        for target in _imports(name, path, known):
            if rank[_layer(target)] > rank[_layer(name)]:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_no_module_circles_inside_a_folder() -> None:
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    for start in graph:  # a module may not reach itself again (depth-first, the package has about 70 modules)
        stack, seen = list(graph[start]), set()
        while stack:
            node = stack.pop()
            assert node != start, f"{start} imports itself through a circle"
            if node not in seen:
                seen.add(node)
                stack.extend(graph[node])


def test_no_module_over_the_limit() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
