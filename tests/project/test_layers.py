"""The shape of the code (docs/architecture.md): entry points on top, one wing per concern
in the `worker` package, imports only downwards, no cycle, no module above 400 lines (entry
points above 150), every module with its test file where the tests mirror the package."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
# Bottom to top; a module may import from its own wing or any wing below, never above.
WINGS: tuple[str, ...] = (
    "base",  # worker/masking.py and model_locator.py: every wing uses them
    "worker.settings", "worker.launch", "worker.upstream", "worker.requests", "worker.serve",
    "worker.diagnose",
    "entry",  # what a user runs: the top level
)
ENTRY_POINTS = {"handler", "local_endpoint", "test_vllm_command"}
BASE = {"worker.masking", "model_locator"}
MAX_LINES, MAX_ENTRY_LINES = 400, 150
# Modules whose tests are not in the mirrored place, and where they are.
TEST_FILE = {"local_endpoint": "tests/serve/test_local_api.py",
             "test_vllm_command": "tests/diagnose/test_report.py",
             "worker.launch.download_transfer": "tests/launch/test_download.py"}


def modules() -> dict[str, Path]:
    """Every module of the project's own code, by dotted name."""
    found = {path.stem: path for path in PROJECT.glob("*.py")}
    for path in (PROJECT / "worker").rglob("*.py"):
        dotted = ".".join(path.relative_to(PROJECT).with_suffix("").parts)
        found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def wing(module: str) -> int:
    if module in ENTRY_POINTS:
        return WINGS.index("entry")
    if module in BASE or module == "worker":
        return WINGS.index("base")
    return WINGS.index(".".join(module.split(".")[:2]))


def own_imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & set(MODULES)


def test_the_top_level_holds_only_what_a_user_runs_and_the_model_locator() -> None:
    assert {path.stem for path in PROJECT.glob("*.py")} == ENTRY_POINTS | {"model_locator"}


def test_every_module_of_the_package_is_in_a_wing() -> None:
    unplaced = [m for m in MODULES if m not in ENTRY_POINTS | BASE | {"worker"}
                and ".".join(m.split(".")[:2]) not in WINGS]
    assert unplaced == [], "add the wing to WINGS (and docs/architecture.md)"


def test_imports_only_run_down_the_wings() -> None:
    upward = [f"{module} imports {used}" for module in MODULES
              for used in own_imports(module) if wing(used) > wing(module)]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    graph = {module: own_imports(module) - {module} for module in MODULES}
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


def test_no_module_is_longer_than_400_lines_and_entry_points_are_thin() -> None:
    paths = [*MODULES.values(), *(PROJECT / "benchmarks").glob("*.py"),
             *(PROJECT / "tools").glob("*.py"), *(PROJECT / "fakes").glob("*.py")]
    long = {p.name: n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    fat = {m: n for m in ENTRY_POINTS
           if (n := len(MODULES[m].read_text().splitlines())) > MAX_ENTRY_LINES}
    assert fat == {}


def test_every_module_has_a_test_file_where_the_tests_mirror_it() -> None:
    def test_file(module: str) -> str:
        if module in TEST_FILE:
            return TEST_FILE[module]
        *folders, leaf = module.removeprefix("worker.").split(".")
        return "/".join(["tests", *folders, f"test_{leaf}.py"])

    code = [m for m in MODULES if MODULES[m].name != "__init__.py"]
    missing = [f"{m}: {test_file(m)}" for m in code if not (PROJECT / test_file(m)).exists()]
    assert missing == []
