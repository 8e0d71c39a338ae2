"""Work inside a session through the real API (uvicorn on real sockets), real NATS and both
databases, with a fake gateway on the bus playing the agent: exec (full and NDJSON), gaps,
cancel, audit before send, tickets, the WebSocket, and the session limits."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine
from gurutunnel_protocol import ErrorCode, Subjects
from gurutunnel_protocol.messages import (
    ChannelClose,
    ExitReason,
    OutputStream,
    SessionFrame,
    ShellResize,
    Terminal,
    TerminalCancel,
    TunnelData,
    TunnelError,
)

from .conftest import (
    FakeGateway,
    LiveApi,
    User,
    Users,
    chunk,
    exit_frame,
    serving_api,
    wait_until,
)

Script = Callable[[Terminal], Any]


@dataclass
class World:
    live: LiveApi
    gw: FakeGateway
    users: Users
    session_id: str

    async def exec(self, body: dict[str, Any], user: User | None = None, **params: str) -> Any:
        user = user or self.users.tech
        return await self.live.client.post(
            f"/api/v1/tunnel/{self.session_id}/exec", json=body, params=params, headers=user.headers
        )

    async def audit(self, action: str = "command.run") -> list[dict[str, Any]]:
        r = await self.live.client.get(
            "/api/v1/audit",
            params={"session_id": self.session_id, "action": action},
            headers=self.users.admin.headers,
        )
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        return rows

    async def ticket(self, user: User | None = None) -> str:
        r = await self.live.client.post(
            f"/api/v1/tunnel/{self.session_id}/ws-ticket",
            headers=(user or self.users.tech).headers,
        )
        assert r.status_code == 201, r.text
        assert r.json()["expires_in"] == 30
        ticket: str = r.json()["ticket"]
        return ticket

    def ws(self, ticket: str, session_id: str | None = None) -> connect:
        return connect(self.live.ws_url(session_id or self.session_id, ticket), open_timeout=5)


def _settings(migrated: ApiSettings, **overrides: Any) -> ApiSettings:
    base: dict[str, Any] = {
        "exec_grace_s": 1.0,
        "exec_close_grace_s": 0.5,
        "session_watch_interval_s": 0.1,
        "activity_write_interval_s": 0.0,
    }
    return migrated.model_copy(update={**base, **overrides})


@dataclass
class WorldFactory:
    migrated: ApiSettings
    nc: NatsClient
    subject_prefix: str
    users: Users

    def __call__(self, **overrides: Any) -> AbstractAsyncContextManager[World]:
        return self._world(**overrides)

    async def _enter(self, live: LiveApi) -> World:
        r = await live.client.post(
            "/api/v1/agents", json={"name": "pc-01"}, headers=self.users.admin.headers
        )
        assert r.status_code == 201, r.text
        gw = await FakeGateway(
            nc=self.nc, subjects=Subjects(self.subject_prefix), agent_id=r.json()["agent"]["id"]
        ).start()
        r = await live.client.post(
            "/api/v1/tunnel/open", json={"agent_id": gw.agent_id}, headers=self.users.tech.headers
        )
        assert r.status_code == 201, r.text
        await gw.watch_down(r.json()["id"])
        return World(live=live, gw=gw, users=self.users, session_id=r.json()["id"])

    def _world(self, **overrides: Any) -> AbstractAsyncContextManager[World]:
        factory = self

        class _Ctx:
            async def __aenter__(self) -> World:
                self.serving = serving_api(_settings(factory.migrated, **overrides))
                live = await self.serving.__aenter__()
                try:
                    self.world = await factory._enter(live)
                except BaseException:
                    await self.serving.__aexit__(None, None, None)
                    raise
                return self.world

            async def __aexit__(self, *exc: object) -> None:
                await self.world.gw.stop()
                await self.serving.__aexit__(None, None, None)

        return _Ctx()


@pytest.fixture
def worlds(
    migrated: ApiSettings, nc: NatsClient, subject_prefix: str, users: Users
) -> WorldFactory:
    return WorldFactory(migrated=migrated, nc=nc, subject_prefix=subject_prefix, users=users)


@pytest.fixture
async def world(worlds: WorldFactory) -> AsyncIterator[World]:
    async with worlds() as w:
        yield w


def _hello(t: Terminal) -> list[SessionFrame]:
    return [
        chunk(t, 0, b"hel"),
        chunk(t, 1, b"oops\n", OutputStream.STDERR),
        chunk(t, 2, b"lo\n"),
        exit_frame(t, 3, exit_code=3, stdout_bytes=6, stderr_bytes=5),
    ]


async def _scripted(frames: Script) -> Callable[[Terminal], Any]:
    async def on_terminal(t: Terminal) -> Any:
        return frames(t)

    return on_terminal


def _ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- REST exec
async def test_exec_returns_the_full_result_assembled_from_the_chunks(world: World) -> None:
    """Chunks of both streams are joined in seq order; exit code, bytes and reason come along."""
    world.gw.on_terminal = await _scripted(_hello)
    r = await world.exec({"argv": ["sh", "-c", "x"], "timeout_s": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["stdout"], body["stderr"]) == ("hello\n", "oops\n")
    assert body["exit_code"] == 3 and body["reason"] == "exited" and body["encoding"] == "utf-8"
    assert (body["stdout_bytes"], body["stderr_bytes"], body["gaps"]) == (6, 5, [])
    assert body["truncated"] is False and body["error"] is None
    sent = world.gw.terminals()[-1]
    assert sent.argv == ["sh", "-c", "x"] and sent.channel_id == body["channel_id"]

    r = await world.exec({"command": "x"}, encoding="base64")
    assert base64.b64decode(r.json()["stdout"]) == b"hello\n"


async def test_exec_stream_yields_started_chunks_and_exit_in_order(world: World) -> None:
    """?stream=true answers NDJSON: started, the chunks with their seq and stream, then exit."""
    world.gw.on_terminal = await _scripted(_hello)
    r = await world.exec({"command": "x"}, stream="true")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    events = _ndjson(r.text)
    assert [e["event"] for e in events] == ["started", "chunk", "chunk", "chunk", "exit"]
    assert events[0]["pid"] == 4242
    assert [(e["seq"], e["stream"], base64.b64decode(e["data"])) for e in events[1:4]] == [
        (0, "stdout", b"hel"),
        (1, "stderr", b"oops\n"),
        (2, "stdout", b"lo\n"),
    ]
    assert events[-1] | {"duration_s": 0} == {
        "event": "exit",
        "seq": 3,
        "reason": "exited",
        "exit_code": 3,
        "truncated": False,
        "duration_s": 0,
        "stdout_bytes": 6,
        "stderr_bytes": 5,
        "error": None,
        "session_close_reason": None,
    }


async def test_skipped_seq_becomes_a_gap_and_other_channels_are_ignored(world: World) -> None:
    """Seq 1-2 missing: a gap event {1, 2} before seq 3; frames of another channel never show."""

    def frames(t: Terminal) -> list[SessionFrame]:
        other = t.model_copy(update={"channel_id": "someone-else"})
        return [
            chunk(t, 0, b"a"),
            chunk(other, 1, b"NOT MINE"),
            chunk(t, 3, b"d"),
            chunk(t, 3, b"duplicate"),
            exit_frame(t, 4),
        ]

    world.gw.on_terminal = await _scripted(frames)
    events = _ndjson((await world.exec({"command": "x"}, stream="true")).text)
    assert [e["event"] for e in events] == ["started", "chunk", "gap", "chunk", "exit"]
    assert (events[2]["from_seq"], events[2]["to_seq"]) == (1, 2)
    full = (await world.exec({"command": "x"})).json()
    assert full["stdout"] == "ad" and full["gaps"] == [{"from_seq": 1, "to_seq": 2}]


async def test_cancel_publishes_terminal_cancel_and_the_stream_ends_cancelled(world: World) -> None:
    """POST .../cancel publishes terminal.cancel on the down subject; the exit says cancelled."""
    channel: list[Terminal] = []

    async def never_ends(t: Terminal) -> list[SessionFrame]:
        channel.append(t)
        return [chunk(t, 0, b"working")]

    world.gw.on_terminal = never_ends
    lines: list[dict[str, Any]] = []

    async def stream() -> None:
        async with world.live.client.stream(
            "POST",
            f"/api/v1/tunnel/{world.session_id}/exec",
            json={"command": "sleep 60"},
            headers={**world.users.tech.headers, "Accept": "application/x-ndjson"},
        ) as r:
            async for line in r.aiter_lines():
                if line:
                    lines.append(json.loads(line))

    reader = asyncio.create_task(stream())

    async def has_chunk() -> bool:
        return len(lines) >= 2

    await wait_until(has_chunk, what="first chunk")
    channel_id = lines[0]["channel_id"]
    r = await world.live.client.post(
        f"/api/v1/tunnel/{world.session_id}/exec/{channel_id}/cancel",
        headers=world.users.tech.headers,
    )
    assert r.status_code == 202 and r.json() == {"channel_id": channel_id}

    async def cancel_seen() -> bool:
        return any(isinstance(f, TerminalCancel) for f in world.gw.down)

    await wait_until(cancel_seen, what="terminal.cancel on the down subject")
    assert [f.channel_id for f in world.gw.down if isinstance(f, TerminalCancel)] == [channel_id]
    await world.gw.publish_up(
        world.session_id, exit_frame(channel[0], 1, reason=ExitReason.CANCELLED, exit_code=None)
    )
    await asyncio.wait_for(reader, 5)
    assert lines[-1]["event"] == "exit" and lines[-1]["reason"] == "cancelled"

    r = await world.live.client.post(
        f"/api/v1/tunnel/{world.session_id}/exec/{channel_id}/cancel",
        headers=world.users.tech.headers,
    )
    assert r.status_code == 404, "a finished command cannot be cancelled"


async def test_audit_row_is_committed_before_the_send_and_completed_after(world: World) -> None:
    """When terminal.command reaches the agent its command.run row exists, open; then completed."""
    seen_at_send: list[list[dict[str, Any]]] = []

    async def check_then_run(t: Terminal) -> list[SessionFrame]:
        seen_at_send.append(await world.audit())
        return _hello(t)

    world.gw.on_terminal = check_then_run
    r = await world.exec({"argv": ["echo", "hi"], "cwd": "/tmp"})
    assert r.status_code == 200
    [row_then] = seen_at_send[0]
    assert row_then["ended_at"] is None and row_then["channel_id"] == r.json()["channel_id"]
    assert row_then["detail"]["argv"] == ["echo", "hi"] and row_then["detail"]["cwd"] == "/tmp"
    assert row_then["actor"] == world.users.tech.id

    async def completed() -> bool:
        rows = await world.audit()
        return rows[0]["ended_at"] is not None

    await wait_until(completed, what="audit row completed")
    [row] = await world.audit()
    assert (row["reason"], row["exit_code"], row["stdout_bytes"], row["stderr_bytes"]) == (
        "exited",
        3,
        6,
        5,
    )
    assert row["truncated"] is False and row["duration_s"] == pytest.approx(0.01)


async def test_session_close_audit_carries_duration_and_traffic(world: World) -> None:
    """The session.close row names the session's duration, commands and output bytes."""
    world.gw.on_terminal = await _scripted(_hello)
    for _ in range(2):
        assert (await world.exec({"command": "x"})).status_code == 200

    async def both_completed() -> bool:
        return all(row["ended_at"] is not None for row in await world.audit())

    await wait_until(both_completed, what="command rows completed")
    r = await world.live.client.post(
        "/api/v1/tunnel/close",
        json={"session_id": world.session_id},
        headers=world.users.tech.headers,
    )
    assert r.status_code == 200, r.text
    [close] = await world.audit("session.close")
    detail = close["detail"]
    assert (detail["commands"], detail["output_bytes"]) == (2, 22)
    assert (detail["uploaded_bytes"], detail["downloaded_bytes"]) == (0, 0)
    assert detail["duration_s"] >= 0


async def test_audit_write_failure_answers_503_and_sends_no_command(world: World) -> None:
    """With tunnel_audit unwritable the exec is 503 database_unavailable and nothing is sent."""
    engine = make_engine(world.live.settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE tunnel_audit RENAME TO tunnel_audit_away"))
        r = await world.exec({"command": "rm -rf /important"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"
        assert world.gw.terminals() == []
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE tunnel_audit_away RENAME TO tunnel_audit"))
        await engine.dispose()


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.CWD_NOT_ALLOWED, 422),
        (ErrorCode.INVALID_COMMAND, 422),
        (ErrorCode.TOO_MANY_CHANNELS, 429),
    ],
)
async def test_agent_refusal_is_answered_with_its_code_and_audited(
    world: World, code: ErrorCode, status: int
) -> None:
    """tunnel.error from the agent: the documented status with the agent's code; row completed."""

    async def refuse(t: Terminal) -> TunnelError:
        return TunnelError(req_id=t.req_id, session_id=t.session_id, code=code, error="no")

    world.gw.on_terminal = refuse
    r = await world.exec({"command": "x", "cwd": "/etc"})
    assert r.status_code == status and r.json()["error"]["code"] == code.value
    [row] = await world.audit()
    assert row["reason"] == code.value and row["ended_at"] is not None


async def test_exec_without_an_exit_frame_ends_with_an_error_line_or_504(world: World) -> None:
    """No exit within timeout_s + grace: NDJSON ends with error agent_timeout; full mode 504."""

    async def silent(t: Terminal) -> list[SessionFrame]:
        return [chunk(t, 0, b"x")]

    world.gw.on_terminal = silent
    events = _ndjson((await world.exec({"command": "x", "timeout_s": 0.2}, stream="true")).text)
    assert events[-1]["event"] == "error" and events[-1]["code"] == "agent_timeout"
    r = await world.exec({"command": "x", "timeout_s": 0.2})
    assert r.status_code == 504 and r.json()["error"]["code"] == "agent_timeout"


async def test_exec_is_refused_to_others_and_on_a_closed_session(world: World) -> None:
    """Another technician gets 403; a bad body 422; after close the exec is 409 conflict."""
    world.gw.on_terminal = await _scripted(_hello)
    r = await world.exec({"command": "x"}, user=world.users.tech2)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await world.exec({"command": "x", "argv": ["x"]})
    assert r.status_code == 422
    r = await world.exec({"command": "x", "shell": True})
    assert r.status_code == 422
    assert (await world.exec({"command": "x"}, user=world.users.admin)).status_code == 200
    r = await world.live.client.post(
        "/api/v1/tunnel/close",
        json={"session_id": world.session_id},
        headers=world.users.tech.headers,
    )
    assert r.status_code == 200
    r = await world.exec({"command": "x"})
    assert r.status_code == 409 and r.json()["error"]["message"] == "session is closed"


async def _assert_hello_by_rest(world: World) -> None:
    """POST exec of a command scripted with ``_hello``: its whole result, no gap."""
    r = await world.exec({"command": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["stdout"], body["stderr"], body["gaps"]) == ("hello\n", "oops\n", [])
    assert (body["reason"], body["exit_code"]) == ("exited", 3)


async def _ws_exec_events(world: World) -> list[dict[str, Any]]:
    """One exec over the technician WebSocket: its messages up to the exit (pongs left out)."""
    async with world.ws(await world.ticket()) as ws:
        await ws.send(json.dumps({"type": "exec", "argv": ["x"], "id": "e1"}))
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not events or events[-1]["type"] != "exit":
                msg = json.loads(await ws.recv())
                if msg["type"] != "pong":
                    events.append(msg)
    return events


@pytest.mark.parametrize("via", ["rest", "ws"])
async def test_output_sent_before_the_started_answer_is_not_lost(world: World, via: str) -> None:
    """The agent's chunk seq 0 and its exit reach the bus before terminal.started does; the
    API's subscriber exists before the command is sent, so REST and WebSocket both get them."""
    world.gw.output_before_started = True
    world.gw.on_terminal = await _scripted(_hello)
    if via == "rest":
        await _assert_hello_by_rest(world)
        return
    events = await _ws_exec_events(world)
    assert events[0]["type"] == "started" and events[0]["id"] == "e1", events
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [(c["seq"], base64.b64decode(c["data"])) for c in chunks] == [
        (0, b"hel"),
        (1, b"oops\n"),
        (2, b"lo\n"),
    ]
    assert not [e for e in events if e["type"] == "gap"], events
    assert (events[-1]["seq"], events[-1]["exit_code"]) == (3, 3)


@pytest.mark.parametrize("inline", [4, 2])
@pytest.mark.parametrize("via", ["rest", "ndjson", "ws"])
async def test_frames_carried_in_the_started_answer_come_first(
    world: World, via: str, inline: int
) -> None:
    """A short command's chunks and exit travel in terminal.started (all 4 frames, or the first
    2 with the rest streamed): every way of reading the command gets them in seq order, with no
    gap, and the audit row is completed from the exit frame."""
    world.gw.inline_frames = inline
    world.gw.on_terminal = await _scripted(_hello)
    if via == "rest":
        await _assert_hello_by_rest(world)
    elif via == "ndjson":
        r = await world.exec({"command": "x"}, stream="true")
        assert r.status_code == 200, r.text
        events = _ndjson(r.text)
        assert [e["event"] for e in events] == ["started", "chunk", "chunk", "chunk", "exit"]
        assert [e["seq"] for e in events[1:]] == [0, 1, 2, 3]
        assert events[-1]["exit_code"] == 3
    else:
        msgs = await _ws_exec_events(world)
        assert [m["type"] for m in msgs] == ["started", "chunk", "chunk", "chunk", "exit"], msgs
        assert [m["seq"] for m in msgs[1:]] == [0, 1, 2, 3]
    assert world.gw.terminals()[-1].inline_result is True  # the API asks for it

    async def completed() -> bool:
        rows = await world.audit()
        return bool(rows) and rows[0]["ended_at"] is not None

    await wait_until(completed, what="audit row completed")
    [row] = await world.audit()
    assert (row["reason"], row["exit_code"], row["stdout_bytes"], row["stderr_bytes"]) == (
        "exited",
        3,
        6,
        5,
    )


# ---------------------------------------------------------------- WebSocket
async def _recv(ws: ClientConnection, want: str, timeout_s: float = 5) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            msg: dict[str, Any] = json.loads(await ws.recv())
            if msg["type"] == want:
                return msg


async def _closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    async def drain() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(drain(), 5)
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


async def test_ticket_is_single_use_and_refused_when_foreign_or_unknown(world: World) -> None:
    """A used, unknown or other-session ticket closes the socket with 4401 right after accept."""
    ticket = await world.ticket()
    async with world.ws(ticket) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await _recv(ws, "pong")) == {"type": "pong"}
    async with world.ws(ticket) as ws:
        assert await _closed_with(ws) == (4401, "ticket already used")
    async with world.ws("no-such-ticket") as ws:
        assert await _closed_with(ws) == (4401, "unknown ticket")
    other = await world.ticket()
    async with world.ws(other, session_id="another-session") as ws:
        assert await _closed_with(ws) == (4401, "ticket is for another session")
    r = await world.live.client.post(
        f"/api/v1/tunnel/{world.session_id}/ws-ticket", headers=world.users.tech2.headers
    )
    assert r.status_code == 403


async def test_expired_ticket_is_refused_with_4401(worlds: WorldFactory) -> None:
    """A ticket past ws_ticket_ttl_s closes the socket with 4401 "ticket expired"."""
    async with worlds(ws_ticket_ttl_s=0.05) as w:
        r = await w.live.client.post(
            f"/api/v1/tunnel/{w.session_id}/ws-ticket", headers=w.users.tech.headers
        )
        ticket = r.json()["ticket"]
        await asyncio.sleep(0.1)  # the ticket's validity itself is what is being tested
        async with w.ws(ticket) as ws:
            assert await _closed_with(ws) == (4401, "ticket expired")


async def test_ws_exec_and_shell_input_and_resize_reach_the_agent(world: World) -> None:
    """On one socket: an exec streams to its exit, a shell gets input/resize/cancel on the bus."""
    world.gw.on_terminal = await _scripted(_hello)
    async with world.ws(await world.ticket()) as ws:
        await ws.send(json.dumps({"type": "shell", "cols": 100, "rows": 30, "id": "s1"}))
        shell = await _recv(ws, "started")
        assert shell["kind"] == "shell" and shell["id"] == "s1"
        await ws.send(json.dumps({"type": "exec", "argv": ["x"], "id": "e1"}))
        started = await _recv(ws, "started")
        assert started["kind"] == "exec" and started["id"] == "e1" and started["pid"] == 4242
        exited = await _recv(ws, "exit")
        assert exited["channel_id"] == started["channel_id"] and exited["exit_code"] == 3

        sid = shell["channel_id"]
        data = base64.b64encode(b"ls\r").decode()
        await ws.send(json.dumps({"type": "input", "channel_id": sid, "data": data}))
        await ws.send(json.dumps({"type": "resize", "channel_id": sid, "cols": 120, "rows": 40}))
        await ws.send(json.dumps({"type": "input", "channel_id": "nope", "data": data}))
        assert (await _recv(ws, "error"))["code"] == "not_found"
        await ws.send(json.dumps({"type": "bogus"}))
        assert (await _recv(ws, "error"))["code"] == "validation_error"
        await ws.send(json.dumps({"type": "cancel", "channel_id": sid}))

        async def all_down() -> bool:
            return any(isinstance(f, ChannelClose) for f in world.gw.down)

        await wait_until(all_down, what="input, resize and close on the down subject")
    [data_frame] = [f for f in world.gw.down if isinstance(f, TunnelData)]
    [resize] = [f for f in world.gw.down if isinstance(f, ShellResize)]
    assert data_frame.data == b"ls\r" and data_frame.channel_id == sid
    assert (resize.cols, resize.rows) == (120, 40)
    assert [r["action"] for r in await world.audit("shell.open")] == ["shell.open"]


async def test_idle_timeout_closes_the_session_and_the_websocket_hears_it(
    worlds: WorldFactory,
) -> None:
    """Past the idle timeout: closed/idle_timeout, one audit row, tunnel.close, session.closed."""
    async with worlds(session_idle_timeout_s=0.6, session_reap_interval_s=0.1) as w:
        async with w.ws(await w.ticket()) as ws:
            for _ in range(3):  # pings are no activity
                await ws.send(json.dumps({"type": "ping"}))
                await _recv(ws, "pong")
            closed = await _recv(ws, "session.closed", timeout_s=10)
            assert closed == {"type": "session.closed", "reason": "idle_timeout"}
            assert (await _closed_with(ws))[0] == 1000
        r = await w.live.client.get(
            f"/api/v1/tunnel/status/{w.session_id}", headers=w.users.tech.headers
        )
        assert (r.json()["state"], r.json()["close_reason"]) == ("closed", "idle_timeout")
        closes = await w.audit("session.close")
        assert [(c["reason"], c["actor"]) for c in closes] == [("idle_timeout", "system")]

        async def told() -> bool:
            return any(c.reason == "idle_timeout" for c in w.gw.closes())

        await wait_until(told, what="tunnel.close to the agent")


async def test_a_running_command_keeps_the_session_from_idling_out(worlds: WorldFactory) -> None:
    """Work still running is not idleness; once it ends, the idle limit closes the session."""
    async with worlds(session_idle_timeout_s=0.6, session_reap_interval_s=0.1) as w:

        def started_only(t: Terminal) -> list[SessionFrame]:
            return [chunk(t, 0, b"working\n")]  # no exit frame: the command keeps running

        w.gw.on_terminal = await _scripted(started_only)
        running = asyncio.create_task(w.exec({"command": "x", "timeout_s": 60}, stream="true"))

        async def audit_open() -> bool:
            return [row["ended_at"] for row in await w.audit()] == [None]

        await wait_until(audit_open, what="the command running")
        await asyncio.sleep(1.5)  # well past the idle timeout, several reaper rounds
        r = await w.live.client.get(
            f"/api/v1/tunnel/status/{w.session_id}", headers=w.users.tech.headers
        )
        assert r.json()["state"] == "active"

        running.cancel()  # the client goes away: the API cancels the command and ends its row

        async def idled_out() -> bool:
            r = await w.live.client.get(
                f"/api/v1/tunnel/status/{w.session_id}", headers=w.users.tech.headers
            )
            return bool(r.json()["close_reason"] == "idle_timeout")

        await wait_until(idled_out, what="idle close after the command ended")


async def test_activity_keeps_the_session_and_max_duration_still_ends_it(
    worlds: WorldFactory,
) -> None:
    """Commands keep an idle limit away, but the maximum duration closes it (max_duration)."""
    async with worlds(
        session_idle_timeout_s=0.8, session_max_duration_s=2.0, session_reap_interval_s=0.1
    ) as w:
        w.gw.on_terminal = await _scripted(_hello)
        answers = []
        for _ in range(40):  # bounded: max_duration (2 s) ends it well before 40 * 0.2 s
            r = await w.exec({"command": "x"})
            answers.append(r.status_code)
            if r.status_code != 200:
                break
            await asyncio.sleep(0.2)  # spacing the activity out is the point of the test
        assert answers[-1] == 409 and len(answers) >= 5, answers
        r = await w.live.client.get(
            f"/api/v1/tunnel/status/{w.session_id}", headers=w.users.tech.headers
        )
        assert r.json()["close_reason"] == "max_duration"


@pytest.mark.parametrize("stream", [False, True], ids=["full", "ndjson"])
async def test_a_command_ended_by_max_duration_says_why_the_session_closed(
    worlds: WorldFactory, stream: bool
) -> None:
    """The technician's result (and NDJSON stream) of a command cut off by the session's end
    names the session's close reason, not only ``session_closed``."""
    async with worlds(
        session_max_duration_s=1.0,
        session_reap_interval_s=0.1,
        session_watch_interval_s=0.2,
        exec_close_grace_s=0.5,
    ) as w:

        def started_only(t: Terminal) -> list[SessionFrame]:
            return [chunk(t, 0, b"working\n")]  # no exit frame: runs until the session ends

        w.gw.on_terminal = await _scripted(started_only)
        if stream:
            events = _ndjson((await w.exec({"command": "x", "timeout_s": 60}, stream="true")).text)
            last = events[-1]
            assert (last["event"], last["code"]) == ("error", "session_closed"), events
            assert last["session_close_reason"] == "max_duration"
        else:
            r = await w.exec({"command": "x", "timeout_s": 60})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["reason"], body["stdout"]) == ("session_closed", "working\n")
            assert body["session_close_reason"] == "max_duration"
