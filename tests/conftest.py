"""Suite-wide fixtures: real NATS and PostgreSQL (see ``tests/support/services.py``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.services import PostgresUnavailable, provide_nats, provide_postgres_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a real NATS server with JetStream, shared by the whole run."""
    with provide_nats() as url:
        yield url


@pytest.fixture
def subject_prefix() -> str:
    """A subject prefix of this test's own, so tests never see each other's traffic."""
    return f"t{secrets.token_hex(4)}.gt"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """``postgresql://`` URL of a real server (skip, or fail under GT_REQUIRE_POSTGRES=1)."""
    try:
        with provide_postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        if os.environ.get("GT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (GT_REQUIRE_POSTGRES=1) but unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """SQLAlchemy async URL of a fresh database for this test, dropped afterwards."""
    name = f"gt_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_server, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = postgres_server.rsplit("/", 1)[0]
    yield f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}"
    admin = await asyncpg.connect(postgres_server, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy async URL of a fresh SQLite file for this test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'gurutunnel.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))
