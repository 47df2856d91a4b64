"""The import structure: no cycle among the product's modules, a consumer that does not load the
console's libraries, and benchmarks that never import the tests.

The graph is read from the source with `ast`, so a cycle is found even where Python would get
through it today (a lazy import, a lucky import order).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("core", "tasks", "console", "huey_app.py")
CONSOLE_LIBRARIES = ("pandas", "streamlit", "plotly")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*roots: str) -> Iterator[Path]:
    for root in roots:
        path = ROOT / root
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in a function, not under
    `if TYPE_CHECKING:` (class bodies, module-level `if`, `try` and `with` count)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from module_level_imports(block)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from module_level_imports(node.body)


def imported_names(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> list[str]:
    """The modules `node` asks for. `from a import b` asks for the module `a.b` when there is
    one, else for `a` (the parent package a submodule import also loads is left out, as for
    `import a.b`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(*roots: str) -> dict[str, set[str]]:
    """Module -> the product modules it imports at module level."""
    files = {module_name(path): path for path in python_files(*roots)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = {
            target
            for node in module_level_imports(tree.body)
            for target in imported_names(node, name, is_package, set(files))
        }
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle() -> None:
    # Given a -> b -> c -> a and d -> a, When cycles are looked for, Then a, b, c are one.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_module_level_imports_skip_functions_and_type_checking() -> None:
    tree = ast.parse(
        "import a\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import b\n"
        "def f():\n    import c\n"
        "class K:\n    import d\n"
        "try:\n    import e\nexcept ImportError:\n    import g\n"
    )
    names = [alias.name for n in module_level_imports(tree.body) for alias in n.names]
    assert names == ["a", "TYPE_CHECKING", "d", "e", "g"]


def test_relative_imports_resolve_to_modules() -> None:
    node = ast.parse("from ..b import c, f").body[0]
    assert isinstance(node, ast.ImportFrom)
    modules = {"pkg.b", "pkg.b.c"}
    assert imported_names(node, "pkg.sub.mod", False, modules) == ["pkg.b.c", "pkg.b"]


def test_the_product_has_no_import_cycle() -> None:
    graph = import_graph(*PRODUCT)
    assert "huey_app" in graph and "tasks.queue" in graph
    assert cycles(graph) == []


def test_nothing_imports_the_consumer_entry_module() -> None:
    # huey_app imports the queue and every task module; a module importing it back would close
    # a cycle at the entry point.
    graph = import_graph(*PRODUCT)
    assert [name for name, targets in graph.items() if "huey_app" in targets] == []


def test_importing_huey_app_leaves_out_the_console_libraries(tmp_path: Path) -> None:
    # A consumer (and a CLI run) starts without pandas, Streamlit or Plotly.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    env["CAPSULE_VAR_DIR"] = str(tmp_path)
    code = (
        "import json, sys\n"
        "import huey_app\n"
        f"print(json.dumps([m for m in {CONSOLE_LIBRARIES!r} if m in sys.modules]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []


def imports_anywhere(path: Path) -> Iterator[str]:
    """Every module `path` imports, at any depth, and every module it runs with `-m`."""
    name = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = imported_names(node, name, path.name == "__init__.py", set())
            yield from (f"{b}.{a.name}" for b, a in zip(base, node.names, strict=True))
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value  # `python -m some.module` arguments are strings


@pytest.mark.parametrize("path", list(python_files("benchmarks")), ids=module_name)
def test_benchmarks_never_import_the_tests(path: Path) -> None:
    found = [m for m in imports_anywhere(path) if re.fullmatch(r"tests(\.\w+)*", m)]
    assert found == []
