"""The package's folders are its layers: imports only point down.

Each top-level module or subpackage of ``taskiq_redis_cluster`` is a unit
with a rank (docs/architecture.md draws the same order). A unit may import
units of a lower rank, and modules of its own subpackage; anything else,
such as the planner reaching up into a broker, fails here with the chain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import taskiq_redis_cluster

PACKAGE = Path(taskiq_redis_cluster.__file__).parent

#: Lower ranks are lower layers. Units of equal rank may not import each other.
RANKS = {
    "_errors": 0,
    "_keys": 1,
    "_events": 1,
    "_serialization": 1,
    "_redis": 2,
    "_options": 3,
    "_lifecycle": 3,
    "_planning": 4,
    "_brokers": 5,
    "_result_backend": 5,
    "_schedule_source": 5,
    "_metrics": 6,
    "_rebalance": 6,
    "testing": 6,
    "_cli": 7,
    "__init__": 8,
}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for top-level modules
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            module = node.module or ""
            if module == "taskiq_redis_cluster" or module.startswith("taskiq_redis_cluster."):
                rest = module.split(".")[1:]
                found.add(rest[0] if rest else "__init__")
            continue
        if node.level > depth + 1:
            continue  # beyond the package: not ours
        if node.level == depth + 1:  # relative to the package root
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        # level <= depth: inside the module's own subpackage
    return found


def test_every_unit_has_a_rank() -> None:
    units = {_unit(p) for p in PACKAGE.rglob("*.py")}
    assert units - set(RANKS) == set(), "give the new unit a rank here and in the docs"


def test_imports_point_down() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        for target in _imported_units(path) - {unit}:
            if RANKS.get(target, 99) >= RANKS[unit]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({unit}) imports {target}")
    assert wrong == []
