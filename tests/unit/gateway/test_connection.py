"""Connection rules with an in-memory bus and socket: backpressure, pending requests, routing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import cast

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedOK

from gurutunnel_gateway.auth import AgentIdentity
from gurutunnel_gateway.bus import BusSubscription, MessageHandler
from gurutunnel_gateway.config import GatewaySettings
from gurutunnel_gateway.connection import (
    AgentConnection,
    ConnectionDeps,
    TokenBucket,
)
from gurutunnel_gateway.hub import Hub
from gurutunnel_protocol import CloseCode, ErrorCode, Subjects
from gurutunnel_protocol.envelope import (
    decode_agent_command,
    decode_command_result,
    decode_server_to_agent,
    encode,
    encode_text,
)
from gurutunnel_protocol.messages import (
    REPLIES_BY_REQUEST,
    REQUEST_TYPES,
    AgentToServer,
    CommandFailed,
    CommandReply,
    DisconnectReason,
    ErrorFrame,
    Heartbeat,
    HostMetrics,
    Terminal,
    TerminalStarted,
    TunnelReady,
)
from tests.integration.gateway.credentials import generate_agent_key


class FakeTransport:
    """What the connection asks of the socket's transport: its unsent bytes."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered


class StuckSocket:
    """A socket whose peer never reads: sends never complete, bytes pile up unsent."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None
        self.transport = FakeTransport(buffered=1 << 20)

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
    ) -> int:
        self.published.append((subject, payload))
        return len(self.published)  # a stream sequence: grows with each publication

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


def queued(conn: AgentConnection) -> str:
    """The next frame waiting in ``conn``'s send queue."""
    assert conn._queue, "no frame queued"
    return conn._queue.popleft()


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


async def test_expired_pending_request_is_answered_agent_timeout() -> None:
    """The sweep answers a request past command_timeout_s with CommandFailed(agent_timeout)."""
    conn, _, bus, hub = make_connection(command_timeout_s=0.01)
    await conn._on_command(request("r1"), "reply.1")
    assert await hub.sweep(time.monotonic() - 1) == 0
    assert bus.published == []
    assert await hub.sweep(time.monotonic() + 1) == 1
    subject, payload = bus.published[-1]
    result = decode_command_result(payload)
    assert subject == "reply.1"
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_TIMEOUT
    assert await hub.sweep(time.monotonic() + 1) == 0  # answered once


async def test_replaced_connection_leaves_requests_to_the_newer_one() -> None:
    """A request reaching a replaced connection is neither forwarded nor answered by it."""
    conn, ws, bus, hub = make_connection()
    newer = AgentConnection(cast(ServerConnection, StuckSocket()), conn.identity, conn._deps)
    newer._cmd_sub = FakeSubscription()  # as run() does before registering
    hub.register(newer)
    assert (await wait_closed(ws))[0] == CloseCode.REPLACED
    assert hub.current(conn.agent_id) is newer
    await conn._on_command(request(), "reply.1")
    assert bus.published == []


@pytest.mark.parametrize(
    "code", [CloseCode.REVOKED, CloseCode.DRAINING, CloseCode.INTERNAL_ERROR, CloseCode.REPLACED]
)
async def test_closing_connection_answers_agent_offline(code: CloseCode) -> None:
    """A command reaching a closing connection with no newer one is answered agent_offline."""
    conn, _, bus, _ = make_connection()
    conn.close(code, DisconnectReason.CLOSED, "closing")
    await conn._on_command(request(), "reply.1")
    subject, payload = bus.published[-1]
    result = decode_command_result(payload)
    assert subject == "reply.1"
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_OFFLINE


async def test_replaced_connection_answers_agent_offline_when_newer_is_closing_too() -> None:
    """If the agent's newer connection is itself closing, the older one still answers."""
    conn, _, bus, hub = make_connection()
    newer = AgentConnection(cast(ServerConnection, StuckSocket()), conn.identity, conn._deps)
    newer._cmd_sub = FakeSubscription()
    hub.register(newer)
    newer.close(CloseCode.REVOKED, DisconnectReason.REVOKED, "revoked")
    await conn._on_command(request(), "reply.1")
    result = decode_command_result(bus.published[-1][1])
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_OFFLINE


class ScriptedSocket:
    """Delivers ``incoming`` (then waits for close); records what the gateway sends."""

    def __init__(self, incoming: list[str | bytes] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[str] = []
        self.closed = asyncio.Event()
        self.closed_with: tuple[int, str] | None = None
        self.close_code: int | None = None
        self.transport = FakeTransport()

    async def recv(self) -> str | bytes:
        if self.incoming:
            return self.incoming.pop(0)
        await self.closed.wait()
        raise ConnectionClosedOK(None, None)

    async def send(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.closed.set()


class GatedBus(FakeBus):
    """``subscribe`` waits until ``open`` is set (a slow flush)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.subscribing = asyncio.Event()

    async def subscribe(self, subject: str, handler: MessageHandler) -> BusSubscription:
        self.subscribing.set()
        await self.open.wait()
        return FakeSubscription()


def unregistered_connection(
    ws: object, bus: FakeBus, **overrides: object
) -> tuple[AgentConnection, Hub]:
    _, pem = generate_agent_key()
    settings = GatewaySettings(agent_public_key=pem, **overrides)  # type: ignore[arg-type]
    hub = Hub()
    deps = ConnectionDeps(
        settings=settings,
        subjects=Subjects("unit.gt"),
        bus=bus,
        hub=hub,
        gateway_id="gw1",
        boot_id="boot1",
    )
    identity = AgentIdentity(agent_id="agent-1", issued_at=datetime.now(UTC))
    return AgentConnection(cast(ServerConnection, ws), identity, deps), hub


def holds_nothing(conn: AgentConnection) -> bool:
    """No send queue and no writer task (an idle connection)."""
    return conn._queue is None and conn._writer is None


async def test_frames_go_out_in_order_and_an_idle_connection_keeps_no_queue() -> None:
    """Queued frames are sent in order; once sent, neither the queue nor the writer is kept,
    and the next frame brings both back."""
    ws = ScriptedSocket()
    conn, _ = unregistered_connection(ws, FakeBus(), send_queue_frames=3)
    frames = [ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message=str(n)) for n in range(4)]
    assert all(conn.send(frame) for frame in frames[:3])
    assert conn._writer is not None
    await asyncio.wait_for(conn._writer, 2)
    assert holds_nothing(conn)
    assert conn.send(frames[3])
    await asyncio.wait_for(conn._writer, 2)
    assert [decode_server_to_agent(text) for text in ws.sent] == frames
    assert holds_nothing(conn)


class GatedSocket(ScriptedSocket):
    """Its first send waits until ``release`` is set (a write that has to wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writing = asyncio.Event()

    async def send(self, text: str) -> None:
        if not self.sent and not self.release.is_set():
            self.writing.set()
            await self.release.wait()
        await super().send(text)


async def test_a_command_on_an_idle_socket_is_written_without_a_writer_task() -> None:
    """send_now writes at once: no queue, no writer task, before and after."""
    ws = ScriptedSocket()
    conn, _ = unregistered_connection(ws, FakeBus())
    frame = ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="now")
    assert await conn.send_now(frame)
    assert [decode_server_to_agent(text) for text in ws.sent] == [frame]
    assert holds_nothing(conn)


async def test_frames_sent_during_a_direct_write_queue_behind_it_in_order() -> None:
    """While send_now's write waits, later frames queue; they follow it, in order."""
    ws = GatedSocket()
    conn, _ = unregistered_connection(ws, FakeBus())
    frames = [ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message=str(n)) for n in range(3)]
    direct = asyncio.create_task(conn.send_now(frames[0]))
    await asyncio.wait_for(ws.writing.wait(), 2)
    assert conn.send(frames[1]) and await conn.send_now(frames[2])
    assert conn._writer is None  # the direct write still runs: nobody else writes yet
    ws.release.set()
    assert await asyncio.wait_for(direct, 2)
    deadline = time.monotonic() + 2
    while len(ws.sent) < len(frames):  # the writer started by the direct write's end
        assert time.monotonic() < deadline, "queued frames not written"
        await asyncio.sleep(0.01)
    assert [decode_server_to_agent(text) for text in ws.sent] == frames
    assert holds_nothing(conn)


async def test_a_socket_with_unsent_bytes_gets_the_command_queued() -> None:
    """A busy socket (bytes not yet written): send_now queues like send, nothing waits."""
    conn, ws, _, _ = make_connection()
    assert ws.transport.buffered > 0
    assert await asyncio.wait_for(conn.send_now(decode_agent_command(request())), 1)
    assert conn._writer is not None and conn._queue is not None


async def test_connection_is_registered_only_after_its_command_subscription() -> None:
    """run() makes the connection current only once the command subscription is flushed."""
    bus, ws = GatedBus(), ScriptedSocket()
    conn, hub = unregistered_connection(ws, bus)
    admitted: list[AgentConnection] = []
    task = asyncio.create_task(conn.run(admitted=admitted.append))
    await asyncio.wait_for(bus.subscribing.wait(), 2)
    assert not hub.is_current(conn)
    assert admitted == []
    bus.open.set()
    deadline = time.monotonic() + 2
    while not admitted:
        assert time.monotonic() < deadline, "connection not admitted in time"
        await asyncio.sleep(0)
    assert hub.is_current(conn) and conn.accepts_commands
    conn.close(CloseCode.NORMAL, DisconnectReason.CLOSED, "done")
    await asyncio.wait_for(task, 2)


async def test_frame_handler_bug_answers_internal_error_and_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception on one frame gets error{internal_error}; the next frame works."""
    good = encode_text(heartbeat_frame())
    ws = ScriptedSocket([good, good])
    bus = FakeBus()
    conn, hub = unregistered_connection(ws, bus)
    hub.register(conn)
    real = conn._on_agent_frame
    calls = 0

    async def flaky(frame: AgentToServer) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a gateway bug")
        await real(frame)

    monkeypatch.setattr(conn, "_on_agent_frame", flaky)
    read = asyncio.create_task(conn._read())
    deadline = time.monotonic() + 2
    while not bus.published:
        assert time.monotonic() < deadline, "heartbeat not published in time"
        await asyncio.sleep(0)
    error = decode_server_to_agent(queued(conn))
    assert isinstance(error, ErrorFrame)
    assert error.code == ErrorCode.INTERNAL_ERROR
    assert bus.published[0][0] == conn._deps.subjects.agent_events("agent-1", "heartbeat")
    conn.close(CloseCode.NORMAL, DisconnectReason.CLOSED, "done")
    await asyncio.wait_for(read, 2)


async def test_command_handler_bug_answers_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception while handling a command is answered CommandFailed at once."""
    conn, _, bus, _ = make_connection()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a gateway bug")

    monkeypatch.setattr("gurutunnel_gateway.connection.decode_agent_command", broken)
    await conn._on_command(request(), "reply.1")
    result = decode_command_result(bus.published[-1][1])
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.INTERNAL_ERROR


async def test_reply_of_the_wrong_kind_gets_error_frame_and_request_stays_pending() -> None:
    """tunnel.ready answering a terminal.command is refused; the right reply still answers."""
    conn, _, bus, _ = make_connection()
    await conn._on_command(request("r1"), "reply.1")
    queued(conn)  # the forwarded request
    await conn._on_agent_frame(TunnelReady(req_id="r1", session_id="s1"))
    error = decode_server_to_agent(queued(conn))
    assert isinstance(error, ErrorFrame)
    assert (error.code, error.req_id) == (ErrorCode.MALFORMED_FRAME, "r1")
    assert bus.published == []
    await conn._on_agent_frame(TerminalStarted(req_id="r1", session_id="s1", channel_id="c1"))
    result = decode_command_result(bus.published[-1][1])
    assert isinstance(result, CommandReply)
    assert isinstance(result.frame, TerminalStarted)


@pytest.mark.parametrize(
    ("kind", "fits", "misfits"),
    [
        ("tunnel.open", {"tunnel.ready", "tunnel.error"}, {"tunnel.closed"}),
        ("tunnel.close", {"tunnel.closed", "tunnel.error"}, {"tunnel.ready"}),
        ("channel.open", {"channel.opened", "tunnel.error"}, {"channel.closed"}),
        ("channel.close", {"channel.closed", "tunnel.error"}, {"channel.opened"}),
        ("terminal.command", {"terminal.started", "tunnel.error"}, {"tunnel.ready"}),
        ("shell.open", {"channel.opened", "tunnel.error"}, {"terminal.started"}),
    ],
)
def test_every_request_kind_has_exactly_its_replies(
    kind: str, fits: set[str], misfits: set[str]
) -> None:
    """REPLIES_BY_REQUEST names the documented replies of each request type and no other."""
    names = {t.model_fields["type"].default for t in REPLIES_BY_REQUEST[kind]}
    assert names == fits
    assert not names & misfits
    assert set(REPLIES_BY_REQUEST) == {t.model_fields["type"].default for t in REQUEST_TYPES}


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    """A bucket of burst 3 at 2/s passes 3 at once, then one more each half second."""
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 100
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_token_bucket_reserve_goes_into_debt_and_says_how_long_to_wait() -> None:
    """reserve() always spends; the answer is the time until the bucket is back to zero."""
    now = [0.0]
    bucket = TokenBucket(100.0, 50, clock=lambda: now[0])
    assert bucket.reserve(40) == 0.0
    assert bucket.reserve(30) == pytest.approx(0.2)  # 20 tokens short at 100/s
    now[0] += 0.2
    assert bucket.reserve(10) == pytest.approx(0.1)
    now[0] += 10
    assert bucket.reserve(50) == 0.0  # refilled, capped at the burst


def heartbeat_frame() -> Heartbeat:
    return Heartbeat(
        sent_at=datetime.now(UTC),
        mode="heartbeat",
        metrics=HostMetrics(
            hostname="h",
            os="Linux",
            cpu_percent=0,
            cpu_count=1,
            mem_total_bytes=1,
            mem_used_percent=1,
            disk_total_bytes=1,
            disk_used_percent=1,
            boot_time=datetime(2024, 1, 1, tzinfo=UTC),
        ),
    )
