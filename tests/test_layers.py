"""The shape of the code (docs/architecture.md): every module in a layer, imports only
downwards, no cycle, no module above 400 lines, every module with its test file."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
# Bottom to top; a module may import from its own layer or any layer below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "masking", "vllm_flags", "http_limits", "compile_cache", "startup_timeline"),
    ("sse", "settings_table", "model_locator", "model_info"),
    ("env_names", "config_file"),
    ("settings",),
    ("parsers", "relay", "vllm_command", "lora"),
    ("routes", "launch_plan"),
    ("supervisor", "proxy", "preflight"),
    ("lora_loader",),
    ("serving",),
    ("lb_endpoint", "local_jobs", "diagnostic"),
    ("handler",),
    ("local_endpoint", "test_vllm_command"),
)
LAYER = {module: index for index, names in enumerate(LAYERS) for module in names}
MAX_LINES = 400
# The diagnostic's entry point (a file users know by name) is tested with the diagnostic.
TEST_FILE = {"test_vllm_command": "test_diagnostic.py"}


def own_imports(module: str) -> set[str]:
    tree = ast.parse((PROJECT / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(LAYER)


def test_every_top_level_module_has_a_layer() -> None:
    modules = {path.stem for path in PROJECT.glob("*.py")}
    assert modules == set(LAYER), "add new modules to LAYERS (and docs/architecture.md)"


def test_imports_only_run_down_the_layers() -> None:
    upward = [f"{module} ({LAYER[module]}) imports {used} ({LAYER[used]})"
              for module in LAYER for used in own_imports(module) if LAYER[used] > LAYER[module]]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    graph = {module: own_imports(module) - {module} for module in LAYER}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, " -> ".join([*visiting, module])
        if module in done:
            return
        visiting.append(module)
        for used in sorted(graph[module]):
            visit(used)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_module_is_longer_than_400_lines() -> None:
    paths = [*PROJECT.glob("*.py"), *(PROJECT / "benchmarks").glob("*.py"),
             *(PROJECT / "tools").glob("*.py")]
    long = {p.name: n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_module_has_a_test_file_named_after_it() -> None:
    tests = PROJECT / "tests"
    missing = [m for m in LAYER if not (tests / TEST_FILE.get(m, f"test_{m}.py")).exists()]
    assert missing == []
