"""Imports point down: every module lives on a floor (README, "Layout") and imports only from floors below
its own, or from its own floor and wing; and no modules import each other in a circle.

Every import counts, including those inside functions (a lazy import that runs up is still a dependency that
runs up); only ``if TYPE_CHECKING:`` blocks are exempt.
"""

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "estimators", "tasks")

#: (module pattern, floor, wing), first match wins; a module no pattern matches fails the test.
FLOORS = (
    # 0 ground: pure-Python tools every wing uses (no torch)
    ("bench.registry", 0, "ground"), ("bench.seeding", 0, "ground"), ("bench.hashing", 0, "ground"),
    ("bench.atomic", 0, "ground"), ("bench.config", 0, "ground"), ("bench.failures", 0, "ground"),
    ("bench.environment", 0, "ground"), ("estimators.options", 0, "ground"), ("bench", 0, "ground"),
    ("estimators", 0, "ground"), ("tasks", 0, "ground"),
    # 1 records and report: the results folder and its rendering (no torch; tests/test_imports.py)
    ("bench.store", 1, "report"), ("bench.metrics", 1, "report"), ("bench.formatting", 1, "report"),
    ("bench.ranking", 1, "report"), ("bench.pooling", 1, "report"), ("bench.overview", 1, "report"),
    ("bench.sections", 1, "report"), ("bench.figures", 1, "report"), ("bench.leaderboard", 1, "report"),
    ("bench.scaling_report", 1, "report"), ("bench.peers_report", 1, "report"), ("bench.records", 1, "report"),
    ("bench.figure_cache", 1, "report"), ("bench.claims", 1, "report"),
    # 2 data types and pure-torch numerics shared by estimators and tasks
    ("tasks.base", 2, "numerics"), ("estimators.autodiff", 2, "numerics"), ("estimators.solvers", 2, "numerics"),
    # 3 components: two wings that do not import each other
    ("estimators.*", 3, "estimators"), ("tasks.*", 3, "tasks"),
    # 4 the harness: planning, ground truth, cells, runner, profiles, publication
    ("bench.cli", 5, "entry"), ("bench.cli_*", 5, "entry"), ("bench.__main__", 5, "entry"),
    ("bench.*", 4, "harness"),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _floor(module: str) -> tuple[int, str]:
    for pattern, floor, wing in FLOORS:
        if fnmatch.fnmatchcase(module, pattern):
            return floor, wing
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {Path(__file__).name} and README's layout")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules ``path`` imports (``from pkg import sub`` resolved to ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    exempt, found = _type_checking_lines(tree), set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in exempt:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_import_points_down():
    upward = []
    for module, targets in sorted(_graph().items()):
        floor, wing = _floor(module)
        for target in sorted(targets):
            target_floor, target_wing = _floor(target)
            if target_floor > floor or (target_floor == floor and target_wing != wing):
                upward.append(f"{module} (floor {floor}, {wing}) imports {target} (floor {target_floor}, {target_wing})")
    assert not upward, "imports that run up or across a floor:\n" + "\n".join(upward)


def test_no_import_circle():
    graph, circles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(" → ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(circles)


def test_the_floor_check_can_fail():  # the rules above, on a made-up upward edge and a made-up circle
    assert _floor("estimators.tracin") == (3, "estimators") and _floor("tasks.resnet") == (3, "tasks")
    assert _floor("bench.runner")[0] > _floor("estimators.tracin")[0] > _floor("tasks.base")[0]
    assert _floor("bench.leaderboard") == (1, "report") and _floor("bench.cli") == (5, "entry")
    graph = _graph()
    assert "bench.metrics" in graph["bench.keys"] and "tasks.base" in graph["estimators.autodiff"]
