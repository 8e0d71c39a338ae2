"""The folder tree is the import tree: each part installs alone and imports only what it may."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PARTS = {
    "gurutunnel_protocol": ROOT / "libs/protocol/gurutunnel_protocol",
    "gurutunnel_api": ROOT / "services/api/gurutunnel_api",
    "gurutunnel_gateway": ROOT / "services/gateway/gurutunnel_gateway",
    "gurutunnel_agent": ROOT / "agent/gurutunnel_agent",
}


def _closure(dist_name: str) -> set[str]:
    """Names of every distribution ``dist_name`` pulls in (requested extras, this platform)."""
    names: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(dist_name, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        names.add(key)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            )
            if wanted:
                todo.append((req.name, frozenset(req.extras)))
    return names


def _imports(package_dir: Path) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in package_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


@pytest.mark.parametrize(
    ("dist", "forbidden"),
    [
        ("gurutunnel-agent", {"fastapi", "sqlmodel", "sqlalchemy", "nats-py", "alembic"}),
        ("gurutunnel-gateway", {"sqlmodel", "sqlalchemy", "alembic", "fastapi", "asyncpg"}),
        ("gurutunnel-protocol", {"fastapi", "sqlmodel", "nats-py", "websockets"}),
    ],
)
def test_each_deployable_pulls_in_only_its_own_dependencies(dist: str, forbidden: set[str]) -> None:
    """The agent needs no web framework, ORM or NATS client; the gateway no ORM."""
    closure = _closure(dist)
    assert "gurutunnel-protocol" in closure or dist == "gurutunnel-protocol"
    assert not (closure & forbidden), f"{dist} pulls in {sorted(closure & forbidden)}"


def test_parts_never_import_each_other() -> None:
    """api, gateway and agent import the protocol package and never one another."""
    for part, directory in PARTS.items():
        others = set(PARTS) - {part, "gurutunnel_protocol"}
        for path, names in _imports(directory).items():
            assert not (names & others), f"{path.relative_to(ROOT)} imports {names & others}"


def test_protocol_imports_only_pydantic_and_the_standard_library() -> None:
    """libs/protocol depends on pydantic and nothing else."""
    allowed = set(sys.stdlib_module_names) | {"pydantic", "pydantic_core", "gurutunnel_protocol"}
    for path, names in _imports(PARTS["gurutunnel_protocol"]).items():
        assert names <= allowed, f"{path.relative_to(ROOT)} imports {sorted(names - allowed)}"


@pytest.mark.parametrize("part", ["gurutunnel_api", "gurutunnel_gateway"])
def test_nats_is_imported_only_by_the_bus_module(part: str) -> None:
    """Each service reaches NATS through its one bus module."""
    users = sorted(
        str(path.relative_to(PARTS[part]))
        for path, names in _imports(PARTS[part]).items()
        if "nats" in names
    )
    assert users == ["bus.py"], users


def test_dependency_closure_sees_what_a_part_really_pulls_in() -> None:
    """Control for the closure check: the API does pull in FastAPI, SQLModel and nats-py."""
    assert {"fastapi", "sqlmodel", "nats-py", "starlette"} <= _closure("gurutunnel-api")
