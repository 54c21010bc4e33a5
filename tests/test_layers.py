"""The package's folders are its layers: imports only point down, through the front door.

Each top-level module or subpackage of ``taskiq_redis_cluster`` is a unit
with a rank (docs/architecture.md draws the same order). A unit may import
units of a lower rank, and modules of its own subpackage; anything else,
such as the planner reaching up into a broker, fails here with the chain.

A subpackage's ``__init__`` is its front door: from outside the subpackage,
``from .._redis import connect`` or ``from taskiq_redis_cluster.testing
import DevCluster``, never ``from .._redis._connection import ...`` nor
``from ..testing._model import ...``. Inside a subpackage, its modules
import each other freely.

Each check lists every offending import as ``file:line``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import taskiq_redis_cluster

PACKAGE = Path(taskiq_redis_cluster.__file__).parent
NAME = PACKAGE.name

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


@dataclass(frozen=True)
class Import:
    """One module an import statement reaches, as a path below the package."""

    line: int
    #: ``("_redis", "_connection")`` for ``taskiq_redis_cluster._redis._connection``;
    #: ``()`` for the package's own ``__init__``.
    target: tuple[str, ...]

    @property
    def unit(self) -> str:
        return self.target[0] if self.target else "__init__"


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent).as_posix()}:{line}"


def _is_subpackage(target: tuple[str, ...]) -> bool:
    return bool(target) and PACKAGE.joinpath(*target, "__init__.py").is_file()


def _is_module(target: tuple[str, ...]) -> bool:
    if not target:
        return False
    return _is_subpackage(target) or PACKAGE.joinpath(*target).with_suffix(".py").is_file()


def _ours(dotted: str) -> tuple[str, ...] | None:
    """``dotted`` as a path below the package, or ``None`` if it is not ours."""
    head, *rest = dotted.split(".")
    return tuple(rest) if head == NAME else None


def _imports(path: Path, source: str | None = None) -> list[Import]:
    """Every module of the package that ``path`` imports (also lazily, or for typing)."""
    tree = ast.parse(path.read_text() if source is None else source)
    # The package a relative import in this file starts from (for an
    # ``__init__.py``, its own folder).
    home = path.relative_to(PACKAGE).parts[:-1]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name)
                if target is not None:
                    found.append(Import(node.lineno, target))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            base = _ours(node.module or "")
            if base is None:
                continue
        else:
            up = node.level - 1
            if up > len(home):
                continue  # beyond the package: not ours
            base = (*home[: len(home) - up], *(node.module.split(".") if node.module else ()))
        targets = {
            # ``from .._redis import _connection`` reaches the module itself.
            (*base, alias.name) if _is_module((*base, alias.name)) else base
            for alias in node.names
        }
        found.extend(Import(node.lineno, target) for target in sorted(targets))
    return found


def _pointing_up(path: Path, source: str | None = None) -> list[str]:
    unit = _unit(path)
    return [
        f"{_where(path, imp.line)}: {unit} (rank {RANKS[unit]}) imports "
        f"{imp.unit} (rank {RANKS.get(imp.unit, '?')})"
        for imp in _imports(path, source)
        if imp.unit != unit and RANKS.get(imp.unit, 99) >= RANKS[unit]
    ]


def _past_the_front_door(path: Path, source: str | None = None) -> list[str]:
    unit = _unit(path)
    return [
        f"{_where(path, imp.line)}: {unit} imports {'.'.join(imp.target)}, "
        f"a module inside {imp.unit}; import it from {imp.unit} (its __init__)"
        for imp in _imports(path, source)
        if imp.unit != unit and len(imp.target) > 1 and _is_subpackage(imp.target[:1])
    ]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_rank() -> None:
    units = {_unit(p) for p in _modules()}
    assert units - set(RANKS) == set(), "give the new unit a rank here and in the docs"


def test_imports_point_down() -> None:
    wrong = [line for path in _modules() for line in _pointing_up(path)]
    assert wrong == [], "\n".join(wrong)


def test_other_subpackages_are_imported_through_their_init() -> None:
    wrong = [line for path in _modules() for line in _past_the_front_door(path)]
    assert wrong == [], "\n".join(wrong)


# The checks themselves, on imports written as if in a CLI module.
_PROBE = PACKAGE / "_cli" / "_probe.py"


@pytest.mark.parametrize(
    "source",
    [
        "from .._redis._connection import scrub",
        "from ..testing._model import STATE_FILE",
        "from taskiq_redis_cluster.testing._model import STATE_FILE",
        "from taskiq_redis_cluster._redis import _connection",
        "from .._redis import connect, _connection",
        "from ..testing import _cluster",
        "import taskiq_redis_cluster._redis._lua",
        "def f():\n    from .._metrics._exporter import run_exporter",
        "if TYPE_CHECKING:\n    from .._planning._planner import Shard",
    ],
)
def test_a_private_module_of_another_subpackage_is_refused(source: str) -> None:
    (wrong,) = _past_the_front_door(_PROBE, source)
    assert wrong.startswith(f"{NAME}/_cli/_probe.py:")


@pytest.mark.parametrize(
    "source",
    [
        "from .._redis import connect",
        "from ..testing import DevCluster",
        "from taskiq_redis_cluster.testing import DevCluster",
        "from .. import _redis, testing",
        "import taskiq_redis_cluster._redis",
        "from .._errors import ClusterError",  # a top-level module is its own unit
        "from ._common import Target",  # the same subpackage
        "from . import _common",
        "from taskiq_redis_cluster._cli._common import Target",
        "from ... import elsewhere",  # beyond the package
        "from redis.asyncio import RedisCluster",
    ],
)
def test_the_front_door_and_the_own_subpackage_are_allowed(source: str) -> None:
    assert _past_the_front_door(_PROBE, source) == []


def test_an_import_pointing_up_is_reported_with_its_line() -> None:
    path = PACKAGE / "_planning" / "_probe.py"
    wrong = _pointing_up(path, "import os\nfrom .._brokers import ClusterStreamBroker\n")
    assert wrong == [f"{NAME}/_planning/_probe.py:2: _planning (rank 4) imports _brokers (rank 5)"]
