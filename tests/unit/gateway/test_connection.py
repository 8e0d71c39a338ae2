"""Connection rules with an in-memory bus and socket: backpressure, pending requests, routing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import cast

from websockets.asyncio.server import ServerConnection

from gurutunnel_gateway.auth import AgentIdentity
from gurutunnel_gateway.bus import BusSubscription, MessageHandler
from gurutunnel_gateway.config import GatewaySettings
from gurutunnel_gateway.connection import AgentConnection, ConnectionDeps
from gurutunnel_gateway.hub import Hub
from gurutunnel_protocol import CloseCode, ErrorCode, Subjects
from gurutunnel_protocol.envelope import decode_command_result, encode
from gurutunnel_protocol.messages import CommandFailed, ErrorFrame, Terminal
from tests.integration.gateway.credentials import generate_agent_key


class StuckSocket:
    """A socket whose peer never reads: sends never complete."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    async def send(self, text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


class FakeSubscription:
    async def unsubscribe(self) -> None:
        return None


class FakeBus:
    """Records publications; subscriptions are accepted and never deliver."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    @property
    def connected(self) -> bool:
        return True

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))

    async def publish_durable(
        self, subject: str, payload: bytes, *, msg_id: str, timeout_s: float
    ) -> None:
        self.published.append((subject, payload))

    async def subscribe(self, subject: str, handler: MessageHandler) -> BusSubscription:
        return FakeSubscription()


def make_connection(**overrides: object) -> tuple[AgentConnection, StuckSocket, FakeBus, Hub]:
    _, pem = generate_agent_key()
    settings = GatewaySettings(agent_public_key=pem, **overrides)  # type: ignore[arg-type]
    bus, hub, ws = FakeBus(), Hub(), StuckSocket()
    deps = ConnectionDeps(
        settings=settings,
        subjects=Subjects("unit.gt"),
        bus=bus,
        hub=hub,
        gateway_id="gw1",
        boot_id="boot1",
    )
    identity = AgentIdentity(agent_id="agent-1", issued_at=datetime.now(UTC))
    conn = AgentConnection(cast(ServerConnection, ws), identity, deps)
    hub.register(conn)
    return conn, ws, bus, hub


def request(req_id: str = "r1") -> bytes:
    return encode(Terminal(req_id=req_id, session_id="s1", channel_id="c1", command="ls"))


async def wait_closed(ws: StuckSocket) -> tuple[int, str]:
    deadline = time.monotonic() + 2
    while ws.closed_with is None:
        assert time.monotonic() < deadline, "socket not closed in time"
        await asyncio.sleep(0)
    return ws.closed_with


async def test_send_queue_overflow_closes_with_backpressure() -> None:
    """A frame beyond send_queue_frames closes the socket with 4004."""
    conn, ws, _, _ = make_connection(send_queue_frames=2)
    frame = ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="x")
    assert conn.send(frame) and conn.send(frame)
    assert not conn.send(frame)
    code, _ = await wait_closed(ws)
    assert code == CloseCode.BACKPRESSURE


async def test_request_that_cannot_be_queued_fails_with_agent_backpressure() -> None:
    """A request arriving on a full send queue is answered CommandFailed(agent_backpressure)."""
    conn, _, bus, _ = make_connection(send_queue_frames=1)
    assert conn.send(ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="fill"))
    await conn._on_command(request(), "reply.1")
    subject, payload = bus.published[-1]
    result = decode_command_result(payload)
    assert subject == "reply.1"
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_BACKPRESSURE


async def test_duplicate_req_id_and_full_table_are_refused() -> None:
    """A req_id already in flight and a full pending table are answered at once."""
    conn, _, bus, _ = make_connection(max_pending_requests=1)
    await conn._on_command(request("r1"), "reply.1")
    assert bus.published == []  # forwarded, waiting for the agent
    await conn._on_command(request("r1"), "reply.2")
    await conn._on_command(request("r2"), "reply.3")
    codes = [
        (subject, cast(CommandFailed, decode_command_result(payload)).code)
        for subject, payload in bus.published
    ]
    assert codes == [
        ("reply.2", ErrorCode.MALFORMED_FRAME),
        ("reply.3", ErrorCode.AGENT_BACKPRESSURE),
    ]


async def test_expired_pending_requests_are_swept() -> None:
    """The sweep drops requests past command_timeout_s without answering them."""
    conn, _, bus, hub = make_connection(command_timeout_s=1)
    await conn._on_command(request("r1"), "reply.1")
    assert hub.sweep(time.monotonic()) == 0
    assert hub.sweep(time.monotonic() + 2) == 1
    assert bus.published == []


async def test_replaced_connection_leaves_requests_to_the_newer_one() -> None:
    """A request reaching a replaced connection is neither forwarded nor answered by it."""
    conn, ws, bus, hub = make_connection()
    newer = AgentConnection(cast(ServerConnection, StuckSocket()), conn.identity, conn._deps)
    hub.register(newer)
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED
    assert hub.current(conn.agent_id) is newer
    await conn._on_command(request(), "reply.1")
    assert bus.published == []
