"""The library's shape: modules small enough to read, no import circle, nothing of the app inside it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LIBRARY = ROOT / "meansparse_core"
MODULES = sorted(p.stem for p in LIBRARY.glob("*.py") if p.stem not in ("__init__", "__main__"))
MAX_LINES = 450


def library_imports(module: str) -> set[str]:
    """The library modules ``module`` imports, at any depth of its code (function bodies included)."""
    tree = ast.parse((LIBRARY / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("meansparse_core"):
                rest = node.module.removeprefix("meansparse_core").lstrip(".")
                found |= {rest} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("meansparse_core.")}
    return {name.split(".")[0] for name in found} & set(MODULES)


def test_no_library_module_is_longer_than_the_limit():
    long = {m: n for m in MODULES if (n := len((LIBRARY / f"{m}.py").read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"


def test_the_library_has_no_import_circle():
    graph = {m: library_imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_the_import_walk_sees_every_form_of_import():
    """The walk above finds relative, absolute and in-function imports: a circle through any of them counts."""
    assert "sparse_model" in library_imports("export") and "fusion" in library_imports("jobs")
    assert "export" in library_imports("cli")  # imported inside a function


def test_each_module_imports_alone_and_without_the_app():
    """Each module imported first, in an interpreter where no other library module is loaded: a module
    that works only after another was imported hides a circle. The library never loads Streamlit or
    the app's packages. (One interpreter, the library's modules dropped between imports: torch loads once.)"""
    code = f"""if True:
        import sys, importlib
        for module in {MODULES!r}:
            for loaded in [m for m in sys.modules if m.split(".")[0] == "meansparse_core"]:
                del sys.modules[loaded]
            importlib.import_module("meansparse_core." + module)
        app = sorted(m for m in sys.modules if m.split(".")[0] in ("streamlit", "meansparse_app"))
        assert not app, app
        print("imported", len({MODULES!r}))
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_the_library_knows_nothing_of_the_app_pages():
    """The app's pages, their links and their tour live in ``meansparse_app/ui/``; the library names none of them."""
    for module in MODULES:
        text = (LIBRARY / f"{module}.py").read_text()
        assert "PAGES" not in text and "views/" not in text, module


#: Standard modules newer than the oldest Python that pyproject.toml supports (3.10).
NEWER_THAN_SUPPORTED = {"tomllib"}


def test_nothing_imports_a_module_the_oldest_supported_python_lacks_without_a_fallback():
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text(), "update NEWER_THAN_SUPPORTED"
    unguarded = []
    for path in [*LIBRARY.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "meansparse_app").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        guarded = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for node in ast.walk(t)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and id(node) not in guarded:
                unguarded += [f"{path.name}: {a.name}" for a in node.names if a.name in NEWER_THAN_SUPPORTED]
    assert not unguarded, unguarded
