"""Takeover rules of one connection with an in-memory bus: order by presence sequence."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import cast

from websockets.asyncio.server import ServerConnection

from gurutunnel_gateway.bus import BusUnavailable
from gurutunnel_gateway.connection import AgentConnection
from gurutunnel_protocol import CloseCode, new_id
from gurutunnel_protocol.envelope import decode_control
from gurutunnel_protocol.messages import AgentConnected, ConnectionTakeover, DisconnectReason
from tests.unit.gateway.test_connection import (
    FakeBus,
    FakeSubscription,
    StuckSocket,
    make_connection,
    request,
    wait_closed,
)


class SequencedBus(FakeBus):
    """``publish_durable`` waits for ``release`` and then returns ``seq`` (or fails)."""

    def __init__(self, seq: int | None) -> None:
        super().__init__()
        self.seq = seq
        self.release = asyncio.Event()

    async def publish_durable(
        self, subject: str, payload: bytes, *, msg_id: str, timeout_s: float
    ) -> int:
        await self.release.wait()
        if self.seq is None:
            raise BusUnavailable("stream unavailable")
        return self.seq


def sequenced(
    seq: int | None, **overrides: object
) -> tuple[AgentConnection, StuckSocket, SequencedBus]:
    conn, ws, _, _ = make_connection(presence_attempts=1, presence_retry_wait_s=0, **overrides)
    bus = SequencedBus(seq)
    conn._deps = dataclasses.replace(conn._deps, bus=bus)
    return conn, ws, bus


def connected_event(conn: AgentConnection) -> AgentConnected:
    return AgentConnected(**conn._stamp(), event_id=new_id(), at=datetime.now(UTC))


def notice(conn: AgentConnection, seq: int, *, conn_id: str | None = None) -> ConnectionTakeover:
    """A notice of another connection of ``conn``'s agent on another gateway."""
    return ConnectionTakeover(
        agent_id=conn.agent_id,
        gateway_id="gw2",
        boot_id="boot2",
        conn_id=conn_id or new_id(),
        connected_seq=seq,
        at=datetime.now(UTC),
    )


def takeovers(bus: FakeBus) -> list[ConnectionTakeover]:
    found = []
    for subject, payload in bus.published:
        if subject.endswith(".gateway.control"):
            message = decode_control(payload)
            assert isinstance(message, ConnectionTakeover)
            found.append(message)
    return found


async def announced(conn: AgentConnection, bus: SequencedBus) -> None:
    bus.release.set()
    await asyncio.wait_for(conn._announce(connected_event(conn)), 2)


async def test_announce_broadcasts_the_stream_sequence_of_presence_connected() -> None:
    """Once presence.connected is acked, a takeover notice carries its stream sequence."""
    conn, _, bus = sequenced(41)
    await announced(conn, bus)
    assert conn.connected_seq == 41
    [sent] = takeovers(bus)
    assert (sent.agent_id, sent.conn_id, sent.connected_seq) == (conn.agent_id, conn.conn_id, 41)
    assert (sent.gateway_id, sent.boot_id) == ("gw1", "boot1")


async def test_newer_notice_closes_the_connection_4000() -> None:
    """A notice with a higher sequence than ours closes us REPLACED."""
    conn, ws, bus = sequenced(10)
    await announced(conn, bus)
    assert conn._deps.hub.takeover(notice(conn, 11)) is True
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED
    assert conn.superseded
    assert conn._close is not None and conn._close.reason == DisconnectReason.REPLACED


async def test_older_notice_and_own_notice_are_ignored() -> None:
    """A notice with a lower sequence (late, reversed race) or naming us closes nothing."""
    conn, ws, bus = sequenced(10)
    await announced(conn, bus)
    assert conn._deps.hub.takeover(notice(conn, 9)) is False
    assert conn._deps.hub.takeover(notice(conn, 12, conn_id=conn.conn_id)) is False
    assert not conn.closing and not conn.superseded
    assert ws.closed_with is None


async def test_newer_notice_before_own_sequence_is_known_closes_once_it_is() -> None:
    """A notice arriving while our presence ack is in flight is compared when it lands."""
    conn, ws, bus = sequenced(10)
    announcing = asyncio.create_task(conn._announce(connected_event(conn)))
    assert conn._deps.hub.takeover(notice(conn, 11)) is False  # not decidable yet
    assert not conn.closing
    bus.release.set()
    await asyncio.wait_for(announcing, 2)
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED
    assert takeovers(bus) == []  # a connection that knows it lost claims nothing


async def test_older_notice_before_own_sequence_is_known_is_ignored_then() -> None:
    """A notice older than our (later known) sequence closes nothing; we announce ourselves."""
    conn, ws, bus = sequenced(10)
    announcing = asyncio.create_task(conn._announce(connected_event(conn)))
    conn._deps.hub.takeover(notice(conn, 9))
    bus.release.set()
    await asyncio.wait_for(announcing, 2)
    assert not conn.closing and ws.closed_with is None
    assert [n.connected_seq for n in takeovers(bus)] == [10]


async def test_connection_without_a_sequence_yields_to_any_notice() -> None:
    """presence.connected lost after its retries: any connection with a sequence wins."""
    conn, ws, bus = sequenced(None)
    await announced(conn, bus)
    assert conn.connected_seq is None and not conn.closing
    assert takeovers(bus) == []
    assert conn._deps.hub.takeover(notice(conn, 1)) is True
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED


async def test_superseded_connection_drops_held_requests_and_answers_nothing() -> None:
    """Superseded: requests it held and new ones get no answer from it (the newer one answers)."""
    conn, ws, bus = sequenced(10)
    await announced(conn, bus)
    await conn._on_command(request("held"), "reply.held")
    assert conn.pending_requests == 1
    before = len(bus.published)
    conn._deps.hub.takeover(notice(conn, 11))
    await wait_closed(ws)
    assert conn.pending_requests == 0
    await conn._on_command(request("late"), "reply.late")
    assert await conn.expire_pending(float("inf")) == 0
    assert bus.published[before:] == []


async def test_older_local_connection_stays_silent_when_current_was_superseded() -> None:
    """Replaced here by a connection that was then superseded elsewhere: still silent."""
    conn, ws, bus = sequenced(10)
    newer = AgentConnection(cast(ServerConnection, StuckSocket()), conn.identity, conn._deps)
    newer._cmd_sub = FakeSubscription()
    conn._deps.hub.register(newer)
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED
    newer._presence_lost = True
    assert conn._deps.hub.takeover(notice(newer, 5)) is True
    await conn._on_command(request(), "reply.1")
    assert bus.published == []
