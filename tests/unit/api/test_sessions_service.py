"""The session service with an in-memory bus (same ``Bus`` interface) on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from gurutunnel_api.agents.models import Agent
from gurutunnel_api.audit.models import TunnelAudit
from gurutunnel_api.auth.models import Role, Technician
from gurutunnel_api.bus import (
    AgentOffline,
    Bus,
    BusError,
    BusUnavailable,
    CommandFrame,
    DownFrame,
    SessionSubscription,
)
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker, utcnow
from gurutunnel_api.errors import ApiError
from gurutunnel_api.migrations import upgrade_database
from gurutunnel_api.sessions.models import SessionState, TechSession
from gurutunnel_api.sessions.service import open_session
from gurutunnel_protocol import ErrorCode, new_id
from gurutunnel_protocol.messages import CommandReply, TunnelClose, TunnelReady


@dataclass
class FakeBus:
    """Answers every request with ``answer`` (a reply factory) or raises ``error``."""

    error: BusError | None = None
    wrong_session: bool = False
    sent: list[CommandFrame] = field(default_factory=list)
    best_effort: list[CommandFrame] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.error is None

    async def request_agent(
        self, agent_id: str, frame: CommandFrame, timeout_s: float
    ) -> CommandReply:
        self.sent.append(frame)
        if self.error is not None:
            raise self.error
        session_id = new_id() if self.wrong_session else getattr(frame, "session_id", "x")
        return CommandReply(
            agent_id=agent_id,
            gateway_id="gw",
            boot_id="boot",
            conn_id="conn",
            frame=TunnelReady(req_id=getattr(frame, "req_id", None), session_id=session_id),
        )

    def send_best_effort(self, agent_id: str, frame: CommandFrame, timeout_s: float) -> None:
        self.best_effort.append(frame)

    async def publish_revocation(self, agent_id: str, not_before: datetime) -> None:
        return None

    async def subscribe_session(self, session_id: str) -> SessionSubscription:
        raise BusUnavailable("the session service never subscribes")

    async def publish_session_down(self, session_id: str, frame: DownFrame) -> None:
        self.sent.append(frame)  # type: ignore[arg-type]


def _as_bus(bus: FakeBus) -> Bus:
    return bus


@dataclass
class World:
    settings: ApiSettings
    sessions: async_sessionmaker[AsyncSession]
    tech: Technician
    agent_id: str


@pytest.fixture
async def world(sqlite_url: str) -> AsyncIterator[World]:
    settings = ApiSettings(
        database_url=sqlite_url, jwt_secret="k" * 40, open_timeout_s=1, close_timeout_s=1
    )
    await upgrade_database(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    tech = Technician(id=new_id(), username="t", password_hash="x", role=Role.TECH.value)
    agent = Agent(id=new_id(), name="pc")
    async with sessions() as db, db.begin():
        db.add_all([tech, agent])
    yield World(settings=settings, sessions=sessions, tech=tech, agent_id=agent.id)
    await engine.dispose()


async def _rows(world: World) -> list[TechSession]:
    async with world.sessions() as db, db.begin():
        return list(await db.scalars(select(TechSession)))


async def test_bus_unavailable_fails_the_session_and_answers_503(world: World) -> None:
    """A bus outage during open: 503 bus_unavailable and the session failed, agent free."""
    bus = FakeBus(error=BusUnavailable("down"))
    async with world.sessions() as db:
        with pytest.raises(ApiError) as caught:
            await open_session(
                db,
                bus=_as_bus(bus),
                settings=world.settings,
                agent_id=world.agent_id,
                tech=world.tech,
            )
    assert (caught.value.status, caught.value.code) == (503, ErrorCode.BUS_UNAVAILABLE)
    assert [(r.state, r.close_reason) for r in await _rows(world)] == [
        ("failed", "bus_unavailable")
    ]


async def test_ready_for_another_session_is_502_and_the_agent_is_told_to_close(
    world: World,
) -> None:
    """A ready that names another session: 502 agent_error, failed, best-effort close sent."""
    bus = FakeBus(wrong_session=True)
    async with world.sessions() as db:
        with pytest.raises(ApiError) as caught:
            await open_session(
                db,
                bus=_as_bus(bus),
                settings=world.settings,
                agent_id=world.agent_id,
                tech=world.tech,
            )
    assert (caught.value.status, caught.value.code) == (502, ErrorCode.AGENT_ERROR)
    rows = await _rows(world)
    assert [(r.state, r.close_reason) for r in rows] == [("failed", "agent_error")]
    assert [type(f) for f in bus.best_effort] == [TunnelClose]


async def test_abandoned_pending_session_is_reaped_by_the_next_open(world: World) -> None:
    """A pending row older than open+close timeouts (a crashed open) no longer blocks the agent:
    it is failed (open_timeout, audited) and the new open succeeds."""
    stale = TechSession(
        id=new_id(),
        agent_id=world.agent_id,
        tech_id=world.tech.id,
        state=SessionState.PENDING.value,
        created_at=utcnow() - timedelta(seconds=60),
    )
    async with world.sessions() as db, db.begin():
        db.add(stale)
    async with world.sessions() as db:
        row = await open_session(
            db,
            bus=_as_bus(FakeBus()),
            settings=world.settings,
            agent_id=world.agent_id,
            tech=world.tech,
        )
    assert row.state == SessionState.ACTIVE.value
    states = {r.id: (r.state, r.close_reason) for r in await _rows(world)}
    assert states[stale.id] == ("failed", "open_timeout")
    async with world.sessions() as db, db.begin():
        audit = list(
            await db.scalars(select(TunnelAudit).where(TunnelAudit.session_id == stale.id))
        )
    assert [(a.action, a.actor) for a in audit] == [("session.failed", "system")]


async def test_bus_unavailable_after_the_request_sends_a_tunnel_close(world: World) -> None:
    """The tunnel.open may have gone out before the bus failed: the agent is told to close."""
    bus = FakeBus(error=BusUnavailable("lost mid-request"))
    async with world.sessions() as db:
        with pytest.raises(ApiError):
            await open_session(
                db,
                bus=_as_bus(bus),
                settings=world.settings,
                agent_id=world.agent_id,
                tech=world.tech,
            )
    (row,) = await _rows(world)
    assert [(type(f), getattr(f, "session_id", None)) for f in bus.best_effort] == [
        (TunnelClose, row.id)
    ]


async def test_no_responders_sends_no_tunnel_close(world: World) -> None:
    """NATS no responders means nothing was delivered: 409 agent_offline and no close."""
    bus = FakeBus(error=AgentOffline(world.agent_id))
    async with world.sessions() as db:
        with pytest.raises(ApiError) as caught:
            await open_session(
                db,
                bus=_as_bus(bus),
                settings=world.settings,
                agent_id=world.agent_id,
                tech=world.tech,
            )
    assert (caught.value.status, caught.value.code) == (409, ErrorCode.AGENT_OFFLINE)
    assert bus.best_effort == []
