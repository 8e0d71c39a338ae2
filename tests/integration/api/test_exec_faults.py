"""Faults around work inside a session, on the real API (uvicorn), real NATS and both databases:
NDJSON clients that stop reading or leave at once, cancellation while a command starts, a
burst of WebSocket execs against the channel limit, technicians demoted or disabled while
their socket is open, a session closed under ``begin_audit``, commands past their deadline on
the WebSocket, and (sans I/O) the WebSocket's early-frame bound keeping the exit frame."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import sqlalchemy as sa
from fastapi import WebSocket
from nats.aio.client import Client as NatsClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from gurutunnel_api.audit.models import AuditAction
from gurutunnel_api.auth.models import Technician
from gurutunnel_api.bus import Bus, FramesDropped, SessionSubscription
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine
from gurutunnel_api.errors import Conflict
from gurutunnel_api.work import service
from gurutunnel_api.work.schemas import ExecCreate, WsErrorOut
from gurutunnel_api.work.service import ChannelTracker, OutputAcks, SessionRef, WorkContext
from gurutunnel_api.work.ws import (
    _EARLY_FRAMES,
    CLOSE_TICKET_REFUSED,
    TechSocket,
    _Channel,
    _Close,
)
from gurutunnel_protocol import new_id
from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    ExitReason,
    SessionFrame,
    SessionUp,
    Terminal,
    TerminalCancel,
)

from .conftest import JWT_SECRET, Users, chunk, exit_frame, wait_until
from .test_exec import World, WorldFactory, _closed_with, _recv, _scripted


@pytest.fixture
def worlds(
    migrated: ApiSettings, nc: NatsClient, subject_prefix: str, users: Users
) -> WorldFactory:
    return WorldFactory(migrated=migrated, nc=nc, subject_prefix=subject_prefix, users=users)


@pytest.fixture
async def world(worlds: WorldFactory) -> AsyncIterator[World]:
    async with worlds() as w:
        yield w


def _subs(w: World) -> int:
    """Session subscriptions the API's bus holds (each run and each socket has one)."""
    return len(w.live.app.state.work.bus._session_subs)


def _cancelled(w: World, channel_id: str) -> Callable[[], Any]:
    async def seen() -> bool:
        return any(isinstance(f, TerminalCancel) and f.channel_id == channel_id for f in w.gw.down)

    return seen


async def _row_ended(w: World) -> dict[str, Any]:
    """The one command.run row of the world, once it has ended."""

    async def ended() -> bool:
        rows = await w.audit()
        return len(rows) == 1 and rows[0]["ended_at"] is not None

    await wait_until(ended, timeout_s=10, what="command.run row completed")
    [row] = await w.audit()
    return row


async def _no_subs(w: World) -> None:
    async def none() -> bool:
        return _subs(w) == 0

    await wait_until(none, timeout_s=10, what="session subscriptions closed")


async def _raw_exec(
    w: World, body: dict[str, Any], *, rcvbuf_bytes: int = 4096
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST .../exec?stream=true on a raw socket with a tiny receive buffer (so a client that
    stops reading makes the server's writes block)."""
    host, port = w.live.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)  # before the handshake
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = json.dumps(body).encode()
    writer.write(
        (
            f"POST /api/v1/tunnel/{w.session_id}/exec?stream=true HTTP/1.1\r\nHost: api\r\n"
            f"Authorization: {w.users.tech.headers['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
        ).encode()
        + raw
    )
    await writer.drain()
    return reader, writer


def _endless(t: Terminal) -> list[SessionFrame]:
    return [chunk(t, 0, b"working")]


# ---------------------------------------------------------------- NDJSON
async def test_ndjson_client_that_stops_reading_has_its_command_cancelled(
    worlds: WorldFactory,
) -> None:
    """A stalled reader: the send bound ends the stream, the agent gets terminal.cancel, the
    audit row is completed with the agent's exit and the subscription is closed."""
    async with worlds(ws_send_timeout_s=0.5) as w:
        sent: list[Terminal] = []

        async def flood(t: Terminal) -> list[SessionFrame]:
            sent.append(t)
            return [chunk(t, i, b"A" * 65536) for i in range(300)]

        w.gw.on_terminal = flood
        reader, writer = await _raw_exec(w, {"argv": ["yes"], "timeout_s": 60})
        try:
            assert (await asyncio.wait_for(reader.read(12), 5)).startswith(b"HTTP/1.1 200")
            # ... and read no more
            await wait_until(_cancelled(w, sent[0].channel_id), timeout_s=10, what="cancel")
            await w.gw.publish_up(
                w.session_id, exit_frame(sent[0], 300, reason=ExitReason.CANCELLED, exit_code=None)
            )
            row = await _row_ended(w)
            assert row["reason"] == "cancelled"
            await _no_subs(w)
        finally:
            writer.close()


@pytest.mark.parametrize("when", ["before_started", "after_started"])
async def test_ndjson_client_that_leaves_at_the_start_does_not_leave_the_command_running(
    worlds: WorldFactory, when: str
) -> None:
    """The client leaves as the command starts: terminal.cancel, audit row ended, no leak."""
    async with worlds() as w:
        sent: list[Terminal] = []
        box: list[asyncio.StreamWriter] = []

        async def leave(t: Terminal) -> list[SessionFrame]:
            sent.append(t)
            if when == "before_started":
                box[0].transport.abort()
            else:
                asyncio.get_running_loop().call_soon(box[0].transport.abort)
            return _endless(t)

        w.gw.on_terminal = leave
        _, writer = await _raw_exec(w, {"argv": ["sleep", "60"], "timeout_s": 60})
        box.append(writer)
        await wait_until(lambda: _has(sent), what="terminal.command")
        await wait_until(_cancelled(w, sent[0].channel_id), timeout_s=10, what="cancel")
        row = await _row_ended(w)
        assert row["reason"] in ("cancelled", "client_gone")
        await _no_subs(w)


async def _has(items: list[Any]) -> bool:
    return bool(items)


async def test_start_cancelled_while_waiting_for_the_agent_completes_the_audit(
    world: World,
) -> None:
    """start_command cancelled before terminal.started: row completed cancelled, cancel sent."""
    world.gw.on_terminal = None
    silent: list[Terminal] = []

    async def never(t: Terminal) -> None:
        silent.append(t)

    world.gw.on_terminal = never
    work: WorkContext = world.live.app.state.work
    ref = SessionRef(session_id=world.session_id, agent_id=world.gw.agent_id, tech_id="someone")
    task = asyncio.create_task(
        service.start_command(work, ref=ref, spec=ExecCreate(command="sleep 60"))
    )
    await wait_until(lambda: _has(silent), what="terminal.command")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await _row_ended(world)
    assert row["reason"] == "cancelled"
    await wait_until(_cancelled(world, silent[0].channel_id), what="cancel")
    await _no_subs(world)


# ---------------------------------------------------------------- begin_audit
async def test_begin_audit_on_a_session_closed_meanwhile_is_409_and_writes_nothing(
    world: World,
) -> None:
    """The reaper closed the session after authorize: begin_audit answers 409, no row stays."""
    r = await world.live.client.post(
        "/api/v1/tunnel/close",
        json={"session_id": world.session_id},
        headers=world.users.tech.headers,
    )
    assert r.status_code == 200
    work: WorkContext = world.live.app.state.work
    ref = SessionRef(
        session_id=world.session_id, agent_id=world.gw.agent_id, tech_id=world.users.tech.id
    )
    with pytest.raises(Conflict) as info:
        await service.begin_audit(
            work.sessionmaker,
            ref=ref,
            action=AuditAction.COMMAND_RUN,
            channel_id=new_id(),
            detail={"command": "x"},
        )
    assert (info.value.status, info.value.message) == (409, "session is closed")
    assert await world.audit() == []
    assert world.gw.terminals() == []


# ---------------------------------------------------------------- WebSocket
async def test_ws_burst_of_execs_starts_no_more_than_the_channel_limit(
    worlds: WorldFactory,
) -> None:
    """8 execs at once with ws_max_channels=2: 2 started, 6 too_many_channels."""
    async with worlds(ws_max_channels=2) as w:
        w.gw.on_terminal = await _scripted(_endless)
        async with w.ws(await w.ticket()) as ws:
            for i in range(8):
                await ws.send(json.dumps({"type": "exec", "argv": ["x"], "id": f"e{i}"}))
            answers: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                while len(answers) < 8:
                    msg = json.loads(await ws.recv())
                    if msg["type"] in ("started", "error"):
                        answers.append(msg)
        kinds = sorted(m["type"] if m["type"] == "started" else m["code"] for m in answers)
        assert kinds == ["started"] * 2 + ["too_many_channels"] * 6
        assert len(w.gw.terminals()) == 2


@pytest.mark.parametrize(
    ("column", "value", "rest_status"), [("role", "viewer", 403), ("disabled", True, 401)]
)
async def test_demoted_or_disabled_technician_loses_exec_and_their_socket(
    world: World, column: str, value: Any, rest_status: int
) -> None:
    """Role set to viewer or account disabled: REST exec refused, open socket closed 4401 and
    its running command cancelled."""
    world.gw.on_terminal = await _scripted(_endless)
    async with world.ws(await world.ticket()) as ws:
        await ws.send(json.dumps({"type": "exec", "argv": ["x"], "id": "e"}))
        started = await _recv(ws, "started")
        engine = make_engine(world.live.settings)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.update(Technician)
                    .where(col(Technician.id) == world.users.tech.id)
                    .values({column: value})
                )
        finally:
            await engine.dispose()
        code, reason = await _closed_with(ws)
        assert (code, reason) == (
            CLOSE_TICKET_REFUSED,
            "technician no longer allowed in this session",
        )
    await wait_until(_cancelled(world, started["channel_id"]), what="cancel of the running command")
    r = await world.exec({"command": "x"})
    assert r.status_code == rest_status, r.text
    assert len(world.gw.terminals()) == 1


async def test_ws_command_past_its_deadline_is_cancelled_on_the_agent(world: World) -> None:
    """No exit within timeout_s + grace on the socket: error agent_timeout, terminal.cancel."""
    world.gw.on_terminal = await _scripted(_endless)
    async with world.ws(await world.ticket()) as ws:
        await ws.send(json.dumps({"type": "exec", "argv": ["x"], "timeout_s": 0.2}))
        started = await _recv(ws, "started")
        error = await _recv(ws, "error")
        assert (error["channel_id"], error["code"]) == (started["channel_id"], "agent_timeout")
        await wait_until(_cancelled(world, started["channel_id"]), what="terminal.cancel")
    row = await _row_ended(world)
    assert row["reason"] == "agent_timeout"


# ---------------------------------------------------------------- early frames (sans I/O)
class _ListSubscription:
    """A session subscription that hands out given items, then waits forever."""

    def __init__(self, items: list[SessionUp]) -> None:
        self.items = items

    async def next(self, timeout_s: float | None) -> SessionUp | FramesDropped | None:
        if self.items:
            return self.items.pop(0)
        await asyncio.Event().wait()
        return None

    async def close(self) -> None:
        self.items.clear()


def test_early_frames_held_are_at_least_what_one_output_window_holds() -> None:
    """An agent cannot send more than a window before its answer: all of it is held."""
    for window, held in ((65536, _EARLY_FRAMES), (1 << 20, (1 << 20) // CHUNK_COST_BYTES + 2)):
        settings = ApiSettings(jwt_secret=JWT_SECRET, output_window_bytes=window)
        ctx = WorkContext(
            settings=settings,
            bus=cast(Bus, None),
            sessionmaker=cast(async_sessionmaker[AsyncSession], None),
        )
        sock = TechSocket(cast(WebSocket, None), ctx, SessionRef("s1", "a1", "t1"))
        assert sock._early_max == held


async def test_early_frame_overflow_keeps_the_exit_frame_and_shows_a_gap() -> None:
    """Beyond _EARLY_FRAMES held chunks, later chunks become a gap but the exit is delivered.
    (The bound is at least what one output window holds: a window this small holds fewer.)"""
    settings = ApiSettings(
        jwt_secret=JWT_SECRET, ws_send_queue_max=4 * _EARLY_FRAMES, output_window_bytes=65536
    )
    ctx = WorkContext(
        settings=settings,
        bus=cast(Bus, None),
        sessionmaker=cast(async_sessionmaker[AsyncSession], None),
    )
    sock = TechSocket(cast(WebSocket, None), ctx, SessionRef("s1", "a1", "t1"))
    t = Terminal(req_id="r1", session_id="s1", channel_id="c1", command="x")
    total = _EARLY_FRAMES + 76
    frames: list[SessionFrame] = [chunk(t, i, b"x") for i in range(total)]
    frames.append(exit_frame(t, total))
    items = [
        SessionUp(
            agent_id="a1",
            gateway_id="g1",
            boot_id="b1",
            conn_id="c",
            session_id="s1",
            seq=i,
            frame=f,
        )
        for i, f in enumerate(frames)
    ]
    channel = _Channel(
        channel_id="c1",
        kind="exec",
        audit_id=None,
        deadline=None,
        started_at=0.0,
        client_id="e1",
        tracker=ChannelTracker("c1"),
        acks=OutputAcks(256 * 1024),
    )
    sock.channels["c1"] = channel
    sub = _ListSubscription(items)
    dispatcher = asyncio.create_task(sock._dispatcher(cast(SessionSubscription, sub)))
    try:

        async def consumed() -> bool:
            return not sub.items

        await wait_until(consumed, what="all frames dispatched")
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    sock._started(channel, pid=7, first=[])
    sent = []
    while not sock.queue.empty():
        item = sock.queue.get_nowait()
        assert not isinstance(item, _Close)
        sent.append(json.loads(item if isinstance(item, str) else item.text))
    assert sent[0]["type"] == "started" and sent[0]["id"] == "e1"
    assert [m["seq"] for m in sent[1:-2]] == list(range(_EARLY_FRAMES))
    assert sent[-2] == {
        "type": "gap",
        "channel_id": "c1",
        "from_seq": _EARLY_FRAMES,
        "to_seq": total - 1,
    }
    assert sent[-1]["type"] == "exit" and sent[-1]["seq"] == total


async def test_send_queue_bounded_in_bytes_drops_a_stalled_reader_with_1013() -> None:
    """Nobody drains the queue (the technician stopped reading): messages are queued until the
    next would pass ``ws_send_queue_max_bytes``, then the socket is marked for 1013 and the
    queue holds no more than the bound, though it could still take many more messages."""
    bound = 256 * 1024
    settings = ApiSettings(
        jwt_secret=JWT_SECRET, ws_send_queue_max=100_000, ws_send_queue_max_bytes=bound
    )
    ctx = WorkContext(
        settings=settings,
        bus=cast(Bus, None),
        sessionmaker=cast(async_sessionmaker[AsyncSession], None),
    )
    sock = TechSocket(cast(WebSocket, None), ctx, SessionRef("s1", "a1", "t1"))
    message = WsErrorOut(code="x", message="y" * 4096)
    sent = 0
    while not sock.overflowed and sent < 1000:
        sock.send(message)
        sent += 1
    assert sock.overflowed, "the byte bound never closed the stalled socket"
    queued: list[str] = []
    while not sock.queue.empty():
        item = sock.queue.get_nowait()
        if isinstance(item, str):
            queued.append(item)
    assert sum(len(text) for text in queued) <= bound
    assert bound // 4200 <= sent <= bound // 4096 + 2  # it stopped at the bound, not before


class _DownRecorder:
    """The bus as far as an abandoned run uses it: records what would go to the agent."""

    def __init__(self) -> None:
        self.down: list[object] = []

    async def publish_session_down(self, session_id: str, frame: object) -> None:
        self.down.append(frame)


async def test_abandoned_command_whose_exit_came_in_the_answer_is_audited_from_that_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader gone before reading a command whose exit travelled in terminal.started: its
    audit row is completed from that exit at once (reason, exit code), no cancel is sent and
    no grace is waited for (sans I/O: the audit writer and the bus are recorded)."""
    completed: list[tuple[int, str, object]] = []

    async def record(
        sessionmaker: object, audit_id: int, *, reason: str, exit_frame: object = None, **_: object
    ) -> None:
        completed.append((audit_id, reason, exit_frame))

    monkeypatch.setattr(service, "complete_audit", record)
    bus = _DownRecorder()
    ctx = WorkContext(
        settings=ApiSettings(jwt_secret=JWT_SECRET, exec_close_grace_s=30.0),
        bus=cast(Bus, bus),
        sessionmaker=cast(async_sessionmaker[AsyncSession], None),
    )
    t = Terminal(req_id="r1", session_id="s1", channel_id="c1", command="x")
    ended = exit_frame(t, 1, exit_code=3, stdout_bytes=2)
    run = service.CommandRun(
        ctx,
        ref=SessionRef("s1", "a1", "t1"),
        channel_id="c1",
        audit_id=7,
        sub=cast(SessionSubscription, _ListSubscription([])),
        timeout_s=5,
        started_at=0.0,
        first_frames=[chunk(t, 0, b"hi"), ended],
    )
    run.abandon()
    assert run._ending is not None
    await asyncio.wait_for(run._ending, 2)  # not exec_close_grace_s
    assert completed == [(7, "exited", ended)]
    assert bus.down == []
