"""The shape of the package (lit_llama/__init__.py has the map): imports point one way, modules stay readable."""

import ast
import subprocess
import sys
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


def test_generation_and_serving_start_without_lightning():
    """Lightning (with what it imports: torchmetrics, scipy, torch._dynamo) is imported where training starts;
    the generate scripts and the server do not need it, and start in half the time without it."""
    code = ("import sys\n"
            "import lit_llama.adapter, lit_llama.checkpoint, lit_llama.generation, lit_llama.lora, lit_llama.lora_tree\n"
            "import lit_llama.multi_lora, lit_llama.run_dir, lit_llama.runs, lit_llama.serving\n"
            "assert 'lightning' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lightning'))[:3]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_nothing_in_the_package_imports_a_script():
    for path in (REPO_ROOT / "lit_llama").glob("*.py"):
        text = path.read_text()
        assert "import finetune" not in text and "from finetune" not in text and "serve" not in imports_of(path)


def test_no_module_is_longer_than_a_sitting():
    long = {path.name: n for path in (REPO_ROOT / "lit_llama").glob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def test_readme_install_command_installs_what_the_tests_need():
    """The README's commands on a fresh machine: the CPU-only torch install as a command of its own, then the
    install, whose extras hold pytest and hypothesis (and every library the tests import lazily), then the
    tests; .ci/run runs each of them."""
    import ast
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    cpu_block, block = [b.split("```", 1)[0] for b in readme.split("```bash")[1:3]]
    assert cpu_block.strip() == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    install = next(line for line in block.splitlines() if line.startswith("pip install -e"))
    extras = re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(",")
    assert block.index("pip install -e") < block.index("pytest tests")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    # as written, but for .ci/run's optional constraints file between `pip install` and `-e`
    for command in (cpu_block.strip(), install.split("#")[0].strip().replace("pip install ", ""), "pytest tests"):
        assert command in ci, command
    assert "python3 -m venv" in ci  # a fresh environment, not the machine's

    setup = ast.parse((REPO_ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    installed = {re.split(r"[<>=\[]", r)[0] for r in keywords["install_requires"]}
    installed |= {re.split(r"[<>=\[]", r)[0] for extra in extras for r in keywords["extras_require"][extra]}
    needed = {"pytest", "hypothesis", "transformers", "peft", "safetensors", "matplotlib", "pyyaml", "huggingface_hub",
              "torch", "lightning", "sentencepiece", "jsonargparse"}
    assert needed <= installed, needed - installed
