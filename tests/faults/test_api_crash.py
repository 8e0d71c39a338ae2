"""The API is SIGKILLed while agents disconnect; once it is started again no session is left
open: the durable presence consumer catches up on the disconnects it missed (and on the ones
the killed process had fetched but not acked, after the consumer's ack wait).

Real ``gurutunnel-api serve`` (PostgreSQL), gateway and agent processes, plus scripted agents
(real WebSocket clients) that disconnect cleanly, on the suite's NATS and PostgreSQL servers
(neither is harmed here) with a subject prefix and a database of this module's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator

import asyncpg
import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from devstack.stack import Stack
from gurutunnel_api.bus import BusHandlers, NatsBus
from gurutunnel_api.config import ApiSettings
from gurutunnel_protocol import Subjects
from tests.e2e.agents import scripted_agent
from tests.support.faults import Api, eventually

from .conftest import Figure, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ADMIN = "admin"
PASSWORD = secrets.token_urlsafe(16)
REAL_AGENTS = 4  # gurutunnel-agent processes, SIGKILLed
SCRIPTED_AGENTS = 4  # WebSocket clients that close cleanly


async def _database(server: str, name: str, *, drop: bool) -> None:
    conn = await asyncpg.connect(server, timeout=10)
    try:
        if drop:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack(
    postgres_server: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = f"gt_crash_{secrets.token_hex(6)}"
    asyncio.run(_database(postgres_server, name, drop=False))
    base = postgres_server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        with running_stack(
            tmp_path_factory.mktemp("api-crash"),
            nats_url=nats_url,
            database_url=f"{base}/{name}",
            prefix="c",
            admin=ADMIN,
            password=PASSWORD,
        ) as s:
            yield s
    finally:
        asyncio.run(_database(postgres_server, name, drop=True))


async def _open_sessions_in_database(stack: Stack) -> int:
    """Sessions ``pending`` or ``active``, read straight from the database (no API runs)."""
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(
                sa.text("SELECT count(*) FROM tech_session WHERE state IN ('pending', 'active')")
            )
    finally:
        await engine.dispose()
    return int(count or 0)


async def _presence_events(stack: Stack) -> int:
    nc = await nats.connect(stack.nats_url, connect_timeout=5)
    try:
        info = await nc.jetstream(timeout=5).stream_info(
            Subjects(stack.config.subject_prefix).presence_stream
        )
        return int(info.state.messages)
    finally:
        await nc.close()


async def test_api_sigkilled_while_agents_disconnect_leaves_no_orphan_after_restart(
    stack: Stack, figure: Figure
) -> None:
    """Sessions on 8 agents; 2 agents go, the API is SIGKILLed, the other 6 go while it is
    down. After the restart every session ends ``closed`` with reason ``agent_disconnected``
    (the presence stream replayed), each with exactly one ``session.close`` audit row: 0
    orphans."""
    async with Api.login(stack, ADMIN, PASSWORD) as api:
        real = [await api.enroll(f"real-{i}-{secrets.token_hex(2)}") for i in range(REAL_AGENTS)]
        scripted = [
            await api.enroll(f"scripted-{i}-{secrets.token_hex(2)}") for i in range(SCRIPTED_AGENTS)
        ]
        procs = [stack.start_agent(agent) for agent in real]
        sockets: list[contextlib.AsyncExitStack] = []
        try:
            for agent in scripted:
                held = contextlib.AsyncExitStack()
                await held.enter_async_context(
                    scripted_agent(stack.gateway_ws_url(), agent.credential, answer_open=True)
                )
                sockets.append(held)
            for agent in [*real, *scripted]:
                await api.wait_online(agent.id)
            sessions = {agent.id: await api.open(agent.id) for agent in [*real, *scripted]}
            events_before = await _presence_events(stack)

            # the disconnects begin; the API dies among them
            await asyncio.to_thread(procs[0].kill)
            await sockets[0].aclose()
            assert stack.api is not None
            await asyncio.to_thread(stack.api.kill)
            killed_at = time.monotonic()
            for proc in procs[1:]:
                await asyncio.to_thread(proc.kill)
            for held in sockets[1:]:
                await held.aclose()

            async def all_disconnects_stored() -> bool:
                return await _presence_events(stack) >= events_before + len(sessions)

            await eventually(all_disconnects_stored, timeout_s=10, what="disconnects in stream")
            orphans_while_down = await _open_sessions_in_database(stack)
            assert orphans_while_down >= len(sessions) - 2  # the API handled 2 at most

            started = time.monotonic()
            await asyncio.to_thread(stack.start_api)
            ready_s = time.monotonic() - started

            async def none_open() -> bool:
                return await _open_sessions_in_database(stack) == 0

            caught_up_s = await eventually(none_open, timeout_s=10, what="no open session")
            kill_to_closed_s = time.monotonic() - killed_at
            for agent_id, session_id in sessions.items():
                closed = await api.session(session_id)
                assert (closed["state"], closed["close_reason"]) == (
                    "closed",
                    "agent_disconnected",
                ), (agent_id, closed)
                rows = await api.client.get(
                    "/audit", params={"session_id": session_id, "action": "session.close"}
                )
                assert rows.status_code == 200, rows.text
                assert rows.json()["count"] == 1, rows.json()
            orphans = await _open_sessions_in_database(stack)
            assert orphans == 0
            figure("api_crash_orphans_while_down", orphans_while_down, "sessions")
            figure("api_crash_restart_to_ready_s", ready_s, "s")
            figure("api_crash_ready_to_all_closed_s", caught_up_s, "s")
            figure("api_crash_kill_to_all_closed_s", kill_to_closed_s, "s")
            figure("api_crash_orphans_after_restart", orphans, "sessions")
        finally:
            for held in sockets:
                await held.aclose()
            for proc in procs:
                proc.stop()


async def _ignore(*_: object) -> None:
    return None


async def _renewed(*_: object) -> bool:
    return True


async def test_a_restarted_api_applies_its_ack_wait_to_the_existing_presence_consumer(
    nats_url: str, subject_prefix: str
) -> None:
    """The ack wait bounds how long an event fetched by a crashed API waits to be redelivered;
    an API started with a new ``presence_ack_wait_s`` updates the durable consumer that an
    earlier version created with another one (else the old value would rule forever)."""
    settings = ApiSettings(
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        jwt_secret="x" * 32,
        presence_ack_wait_s=30.0,
    )
    subjects = Subjects(subject_prefix)
    for ack_wait_s in (30.0, 2.5):
        bus = NatsBus(
            settings.model_copy(update={"presence_ack_wait_s": ack_wait_s}),
            BusHandlers(_ignore, _ignore, _renewed),
        )
        try:
            await bus.start()
        finally:
            await bus.close()
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.consumer_info(subjects.presence_stream, subjects.presence_consumer)
        assert info.config.ack_wait == 2.5
        await js.delete_stream(subjects.presence_stream)
    finally:
        await nc.close()
