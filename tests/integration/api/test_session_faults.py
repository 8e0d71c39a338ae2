"""Session faults: abandoned and cancelled opens, the stale-pending sweeper, zombie sessions on
the agent, a revoke racing an open, and connection order by stream sequence. Real NATS, both
databases, a fake gateway on the bus."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NatsClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gurutunnel_api.agents.models import Agent
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker, utcnow
from gurutunnel_api.sessions.events import on_connected
from gurutunnel_api.sessions.models import SessionState, TechSession
from gurutunnel_protocol import new_id

from .conftest import (
    Api,
    EnrolledAgent,
    FakeGateway,
    Users,
    enroll,
    running_api,
    wait_until,
)


async def insert_stale_pending(settings: ApiSettings, *, agent_id: str, tech_id: str) -> str:
    """A pending row as a crashed open leaves it, older than open + close timeouts."""
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as db, db.begin():
            row = TechSession(
                id=new_id(),
                agent_id=agent_id,
                tech_id=tech_id,
                state=SessionState.PENDING.value,
                created_at=utcnow() - timedelta(seconds=60),
            )
            db.add(row)
    finally:
        await engine.dispose()
    return row.id


async def session_state(api: Api, users: Users, session_id: str) -> tuple[str, str | None]:
    resp = await api.client.get(f"/api/v1/tunnel/status/{session_id}", headers=users.tech.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["state"], body["close_reason"]


def sessionmaker_of(api: Api) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = api.app.state.sessionmaker
    return maker


async def test_open_over_a_stale_pending_row_answers_201(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """An abandoned pending row is reaped by the next open, which answers 201 (not 500), and
    the agent is told to close the reaped session."""
    stale_id = await insert_stale_pending(api.settings, agent_id=agent.id, tech_id=users.tech.id)
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "active"
    assert await session_state(api, users, stale_id) == ("failed", "open_timeout")

    async def close_sent() -> bool:
        return any(c.session_id == stale_id for c in gateway.closes())

    await wait_until(close_sent, what="tunnel.close for the reaped session")


async def test_cancelled_open_fails_the_session_and_tells_the_agent_to_close(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """Cancelling the request while it waits for tunnel.ready leaves no pending row: the
    session is failed/cancelled and the agent receives a tunnel.close for it."""
    gateway.mode = "never"
    request = asyncio.create_task(
        api.client.post(
            "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
        )
    )

    async def open_reached_agent() -> bool:
        return any(getattr(f, "type", "") == "tunnel.open" for f in gateway.received)

    await wait_until(open_reached_agent, what="tunnel.open at the agent")
    session_id = gateway.received[0].session_id
    request.cancel()
    done, _ = await asyncio.wait({request}, timeout=5)
    assert done, "the cancelled request did not end"

    async def failed() -> bool:
        return await session_state(api, users, session_id) == ("failed", "cancelled")

    await wait_until(failed, what="the cancelled session failed")

    async def close_sent() -> bool:
        return any(c.session_id == session_id for c in gateway.closes())

    await wait_until(close_sent, what="tunnel.close for the cancelled session")


async def test_sweeper_fails_an_old_pending_row_on_its_own(
    migrated: ApiSettings, users: Users, nc: NatsClient, subject_prefix: str
) -> None:
    """With no open coming, the lifespan's sweeper fails a stale pending row (audited) and sends
    tunnel.close for it."""
    settings = migrated.model_copy(update={"pending_sweep_interval_s": 0.1})
    async with running_api(settings) as api:
        agent = await enroll(api, users.admin)
        gateway = await FakeGateway(
            nc=nc, subjects=api.app.state.bus.subjects, agent_id=agent.id
        ).start()
        try:
            stale_id = await insert_stale_pending(
                settings, agent_id=agent.id, tech_id=users.tech.id
            )

            async def failed() -> bool:
                return await session_state(api, users, stale_id) == ("failed", "open_timeout")

            await wait_until(failed, what="the sweeper to fail the stale row")

            async def close_sent() -> bool:
                return any(c.session_id == stale_id for c in gateway.closes())

            await wait_until(close_sent, what="tunnel.close from the sweeper")
            audit = await api.client.get(
                "/api/v1/audit", params={"session_id": stale_id}, headers=users.admin.headers
            )
            assert [(r["action"], r["actor"]) for r in audit.json()["data"]] == [
                ("session.failed", "system")
            ]
        finally:
            await gateway.stop()


async def test_busy_agent_holding_a_session_unknown_open_is_told_to_close_it(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """tunnel_busy naming a held session while the database has no open session for the
    agent: 409 agent_busy, and a tunnel.close for the zombie session the agent named."""
    zombie = new_id()
    gateway.mode = "busy"
    gateway.held_session_id = zombie
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "agent_busy"

    async def zombie_closed() -> bool:
        return any(c.session_id == zombie for c in gateway.closes())

    await wait_until(zombie_closed, what="tunnel.close for the zombie session")


async def test_revoke_landing_while_an_open_waits_refuses_the_activation(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """An agent revoked between the pending insert and tunnel.ready: the open answers 409, the
    session is closed (revoked) and the agent is told to close it."""

    async def revoke_in_database() -> None:
        engine = make_engine(api.settings)
        try:
            async with make_sessionmaker(engine)() as db, db.begin():
                row = await db.get(Agent, agent.id)
                assert row is not None
                row.revoked_at = utcnow()
        finally:
            await engine.dispose()

    gateway.before_ready = revoke_in_database
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 409, resp.text
    rows = (await api.client.get("/api/v1/tunnel/sessions", headers=users.tech.headers)).json()
    assert [(r["state"], r["close_reason"]) for r in rows["data"]] == [("closed", "revoked")]
    session_id = rows["data"][0]["id"]

    async def close_sent() -> bool:
        return any(c.session_id == session_id for c in gateway.closes())

    await wait_until(close_sent, what="tunnel.close after the refused activation")


async def test_late_connected_of_an_older_conn_closes_nothing_newer(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """Connections are ordered by the stream sequence of their connected event: a connected
    of an older connection (lower sequence) handled after a session became active on a newer
    one closes nothing, even when its gateway time is later than the activation."""
    maker = sessionmaker_of(api)
    new_conn = gateway.conn_id
    async with maker() as db:
        await on_connected(db, gateway.connected(), 20)
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    session_id = resp.json()["id"]

    old = gateway.connected(at=datetime.now(UTC) + timedelta(seconds=30))
    old = old.model_copy(update={"conn_id": new_id()})
    async with maker() as db:
        await on_connected(db, old, 10)
    assert await session_state(api, users, session_id) == ("active", None)
    async with maker() as db, db.begin():
        current = await db.get(Agent, agent.id)
        assert current is not None
        assert current.conn_id == new_conn

    # a newer connection (higher sequence) does close it
    newer = gateway.connected().model_copy(update={"conn_id": new_id()})
    async with maker() as db:
        await on_connected(db, newer, 30)
    assert await session_state(api, users, session_id) == ("closed", "agent_disconnected")


async def test_connected_leaves_sessions_on_a_conn_whose_connected_is_unhandled(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """A session on a connection whose connected event has not been handled yet is left alone
    by another connection's connected event."""
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    other = gateway.connected().model_copy(update={"conn_id": new_id()})
    async with sessionmaker_of(api)() as db:
        await on_connected(db, other, 5)
    assert await session_state(api, users, resp.json()["id"]) == ("active", None)
