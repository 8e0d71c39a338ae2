"""End-to-end fixtures: the real API (uvicorn), gateway and agent processes on real NATS.

One stack per module and database (SQLite and PostgreSQL), with compressed timings; each test
enrols agents of its own, so tests do not depend on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack.stack import API_PREFIX, Stack, StackConfig


def new_admin_token(stack: Stack) -> str:
    """The token of a fresh admin of ``stack``."""
    username = f"admin{secrets.token_hex(3)}"
    return stack.token(username, stack.create_admin(username))


@contextlib.asynccontextmanager
async def api_client(
    stack: Stack, token: str | None, *, timeout_s: float = 60
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of ``stack``'s API under ``/api/v1``, carrying ``token`` when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        base_url=f"{stack.api_url}{API_PREFIX}", headers=headers, timeout=timeout_s
    ) as client:
        yield client


E2E_API_ENV = {"GT_API_OPEN_TIMEOUT_S": "2", "GT_API_CLOSE_TIMEOUT_S": "2"}
E2E_GATEWAY_ENV = {
    "GT_GATEWAY_PING_INTERVAL_S": "1",
    "GT_GATEWAY_PING_TIMEOUT_S": "1",
    "GT_GATEWAY_HEARTBEAT_INTERVAL_S": "0.5",
}
E2E_AGENT_ENV = {
    "GT_AGENT_HEARTBEAT_INTERVAL_S": "1",
    "GT_AGENT_BACKOFF_INITIAL_S": "0.1",
    "GT_AGENT_BACKOFF_MAX_S": "1",
}


async def _create_db(server: str, name: str) -> None:
    conn = await asyncpg.connect(server, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_db(server: str, name: str) -> None:
    conn = await asyncpg.connect(server, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.contextmanager
def module_stack(
    request: pytest.FixtureRequest,
    nats_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    name: str = "stack",
    api_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """API + gateway processes on a database of their own (``request.param``: "sqlite" or
    "postgres") and a subject prefix of their own; ``api_env`` replaces ``E2E_API_ENV``."""
    root: Path = tmp_path_factory.mktemp(f"{name}-{request.param}")
    database_url: str | None = None
    db_name = ""
    server = ""
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        db_name = f"gt_e2e_{secrets.token_hex(6)}"
        asyncio.run(_create_db(server, db_name))
        base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        database_url = f"{base}/{db_name}"
    config = StackConfig(
        root=root,
        nats_url=nats_url,
        database_url=database_url,
        subject_prefix=f"e{secrets.token_hex(4)}.gt",
        api_env=E2E_API_ENV if api_env is None else api_env,
        gateway_env=E2E_GATEWAY_ENV,
        agent_env=E2E_AGENT_ENV,
    )
    s = Stack(config)
    try:
        s.start_api()
        s.start_gateway()
        yield s
    finally:
        s.close()
        if db_name:
            asyncio.run(_drop_db(server, db_name))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """API + gateway processes on this module's own database and subject prefix."""
    with module_stack(request, nats_url, tmp_path_factory) as s:
        yield s
