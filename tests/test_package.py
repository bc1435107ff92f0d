"""The shape of the package (lit_llama/__init__.py has the map): imports point one way, modules stay readable."""

import ast
from pathlib import Path

from conftest import REPO_ROOT

MAX_MODULE_LINES = 500


def imports_of(path: Path) -> set:
    """The lit_llama modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_llama."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lit_llama.")}
    return found


def test_no_import_cycle_in_the_package():
    graph = {f"lit_llama.{path.stem}": imports_of(path) for path in (REPO_ROOT / "lit_llama").glob("*.py")}
    done, on_path = set(), []

    def visit(module: str) -> None:
        assert module not in on_path, f"import cycle: {' -> '.join(on_path[on_path.index(module):] + [module])}"
        if module in done:
            return
        on_path.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_nothing_in_the_package_imports_a_script():
    for path in (REPO_ROOT / "lit_llama").glob("*.py"):
        text = path.read_text()
        assert "import finetune" not in text and "from finetune" not in text and "serve" not in imports_of(path)


def test_no_module_is_longer_than_a_sitting():
    long = {path.name: n for path in (REPO_ROOT / "lit_llama").glob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"
