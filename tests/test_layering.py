"""Every import points down: kernels → allocator.core → allocator.model → allocator.levels → profilers / search →
allocator.app → allocator.benchmarks. Read from the source (AST), lazy imports inside functions included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("allocator", "search", "profilers", "kernels")
# Layer of each package prefix (the longest matching prefix wins). profilers and search share a rank but may not
# import each other: they are siblings over the same lower layers.
LAYERS = {
    "kernels": 0,
    "allocator.core": 1,
    "allocator.model": 2,
    "allocator.levels": 3,
    "profilers": 4,
    "search": 4,
    "allocator.app": 5,
    "allocator.__main__": 5,
    "allocator.benchmarks": 6,
}
SIBLINGS = {("profilers", "search"), ("search", "profilers")}


def layer_of(module: str) -> str:
    """The LAYERS key that owns `module` (the package root `allocator` itself is the core: it imports nothing)."""
    matches = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    if not matches:
        if module == "allocator":
            return "allocator.core"
        raise AssertionError(f"module {module} is in no layer; add its package to LAYERS")
    return max(matches, key=len)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every project import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            src = layer_of(module_name(path, root))
            for line, target in imported_modules(path, root):
                dst = layer_of(target)
                if LAYERS[dst] > LAYERS[src] or (src, dst) in SIBLINGS:
                    bad.append(f"{path.relative_to(root)}:{line} ({src}) imports {target} ({dst})")
    return bad


def test_every_import_points_down():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a copy of the tree with one deliberate upward import fails it."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            dst = tmp_path / path.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(path.read_text())
    space = tmp_path / "allocator" / "core" / "space.py"
    space.write_text(space.read_text() + "\nfrom search.base import SEARCHERS  # upward: core -> search\n")
    assert [b for b in upward_imports(tmp_path) if "allocator/core/space.py" in b and "search.base" in b]


@pytest.mark.parametrize("module", ["allocator.core.space", "allocator.core.config", "allocator.core.budget"])
def test_the_core_loads_no_app_frameworks(module):
    """Importing the space definition, the configs or the budgets loads no Optuna, DEAP or Hydra."""
    code = f"import sys, {module}; print([m for m in ('optuna', 'deap', 'hydra') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
