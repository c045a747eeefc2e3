"""The layer contract: the code's imports keep the floors README's layout section draws.

- Ground floor: contracts, settings, errors, the Kafka helpers and embedded broker, the SDK emitter, the outcome
  tables and their SQL client, the pure ACT-R maths, the reward functions and the model helpers. It imports
  nothing above it.
- Tiers: `streams/`, `learners/`, `serving/`. Each imports the ground floor and itself, never another tier.
- Roof: the CLI and the other entry points (`up`, `demo`, `report`, `knowledge`). Nothing imports them.

An import inside a function is allowed only for weight (its target loads torch, pyarrow, duckdb, faust and the
like, or the importer is on the roof, where `taoflow --help` must stay fast), never to dodge a cycle. Module-level
import cycles fail here too.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "streams", "learners", "serving", "taoflow")
GROUND = (
    "schemas", "taoflow.exceptions", "taoflow.settings", "taoflow.lora", "taoflow.metrics", "taoflow.broker",
    "taoflow.spool", "taoflow.emitter", "taoflow.restart", "learners.exceptions", "learners.actr", "learners.rewards",
    "learners.models",
    "learners.generation", "learners.tasks", "streams.exceptions", "streams.store", "streams.sqlguard",
    "streams.sqlapi", "streams.lake", "serving.exceptions",
)  # fmt: skip
ROOF = ("taoflow", "taoflow.cli", "taoflow.up", "taoflow.demo", "taoflow.report", "taoflow.knowledge",
        "taoflow.bars")  # fmt: skip
HEAVY = ("torch", "transformers", "trl", "peft", "vllm", "accelerate", "datasets", "faust", "mode", "aiokafka",
         "pyarrow", "duckdb", "fastapi", "uvicorn", "starlette", "aiohttp", "httpx", "prometheus_client", "plotly",
         "apscheduler", "kafka", "rich", "click")  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def floor(module: str) -> int:
    if module in ROOF:
        return 2
    return 0 if any(module == g or module.startswith(g + ".") for g in GROUND) else 1


def _resolve(name: str) -> str | None:
    """The module of ours an import names (`from a.b import c` may name module `a.b.c` or a name in `a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> tuple[tuple[str, int, bool], ...]:
    """(our module imported, line, inside a function) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f)}  # fmt: skip
    typing_only = {id(n) for b in tree.body if isinstance(b, ast.If) and _is_type_checking(b) for n in ast.walk(b)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module and id(node) not in typing_only:
                found.append((target, node.lineno, id(node) in nested))
    return tuple(sorted(set(found)))


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


@cache
def heavy(module: str) -> bool:
    """Whether importing `module` loads a heavy third-party package (at module level, directly or through ours)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in HEAVY:
            return True
    return any(heavy(t) for t, _, lazy in imports(module) if not lazy and t != module and not _is_package_of(t, module))


def _is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _tier(module: str) -> str:
    return module.split(".")[0]


def test_every_arrow_points_down_and_tiers_stay_apart() -> None:
    wrong = []
    for module in sorted(MODULES):
        for target, line, _lazy in imports(module):
            where = f"{MODULES[module].relative_to(ROOT)}:{line}: {module} -> {target}"
            if floor(target) > floor(module):
                wrong.append(f"{where} (up: floor {floor(module)} -> {floor(target)})")
            elif floor(module) == floor(target) == 1 and _tier(module) != _tier(target):
                wrong.append(f"{where} (across tiers)")
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_imports_inside_functions_are_for_weight_only() -> None:
    wrong = []
    for module in sorted(MODULES):
        for target, line, lazy in imports(module):
            if lazy and floor(module) != 2 and not heavy(target):
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} -> {target}")
    assert not wrong, "imports hidden in functions whose target is light (import it at the top):\n" + "\n".join(wrong)


@pytest.mark.parametrize("group", [GROUND, ROOF])
def test_the_declared_floors_name_real_modules(group: tuple[str, ...]) -> None:
    assert all(any(m == g or m.startswith(g + ".") for m in MODULES) for g in group)


def test_no_module_level_import_cycle() -> None:
    graph = {m: {t for t, _, lazy in imports(m) if not lazy and not _is_package_of(t, m)} for m in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
