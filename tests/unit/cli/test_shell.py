"""``gurutunnel shell`` against a real local websockets server, with a fake terminal (no tty)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from gurutunnel_cli.client import ApiClient
from gurutunnel_cli.errors import ApiError, AuthError, NetworkError
from gurutunnel_cli.shell import run_shell

Script = Callable[[ServerConnection], Awaitable[None]]


class FakeTerminal:
    """A Terminal without a tty: input and resizes are driven by the test."""

    def __init__(self) -> None:
        self.cols, self.rows = 100, 30
        self.raw_entered = 0
        self.raw_active = False
        self.output = bytearray()
        self.notices: list[str] = []
        self.on_data: Callable[[bytes], None] | None = None
        self.on_resize: Callable[[], None] | None = None
        self.wrote = asyncio.Event()

    def size(self) -> tuple[int, int]:
        return self.cols, self.rows

    @contextlib.contextmanager
    def raw_mode(self) -> Iterator[None]:
        self.raw_entered += 1
        self.raw_active = True
        try:
            yield
        finally:
            self.raw_active = False

    def start_input(self, on_data: Callable[[bytes], None]) -> Callable[[], None]:
        self.on_data = on_data
        return lambda: None

    def watch_resize(self, on_resize: Callable[[], None]) -> Callable[[], None]:
        self.on_resize = on_resize
        return lambda: None

    def write(self, data: bytes) -> None:
        self.output += data
        self.wrote.set()

    def notice(self, text: str) -> None:
        self.notices.append(text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _exit_msg(code: int | None, reason: str = "exited") -> str:
    return json.dumps(
        {
            "type": "exit",
            "channel_id": "ch1",
            "seq": 9,
            "reason": reason,
            "exit_code": code,
            "truncated": False,
            "duration_s": 1.0,
            "stdout_bytes": 1,
            "stderr_bytes": 0,
            "error": None,
        }
    )


@contextlib.asynccontextmanager
async def api_with_ws(script: Script) -> AsyncIterator[tuple[ApiClient, list[str]]]:
    """A ticket endpoint (MockTransport) and a real WebSocket server running ``script``."""
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        await script(ws)

    def ticket(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/tunnel/s1/ws-ticket"
        return httpx.Response(201, json={"ticket": "tk+1/=", "expires_in": 30})

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = ApiClient(f"http://127.0.0.1:{port}", "tok", transport=httpx.MockTransport(ticket))
        async with client:
            yield client, paths


async def _recv_json(ws: ServerConnection) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return msg


async def test_shell_forwards_input_and_resize_writes_output_and_returns_exit_code() -> None:
    """shell{cols,rows} is sent, input and resize are forwarded, output written, exit code kept."""
    term = FakeTerminal()
    seen: list[dict[str, Any]] = []

    async def script(ws: ServerConnection) -> None:
        seen.append(await _recv_json(ws))
        await ws.send(json.dumps({"type": "started", "channel_id": "ch1", "kind": "shell"}))
        out = {"type": "chunk", "channel_id": "ch1", "seq": 0, "stream": "stdout"}
        await ws.send(json.dumps({**out, "data": _b64(b"$ ")}))
        seen.append(await _recv_json(ws))  # input and resize, in either order
        seen.append(await _recv_json(ws))
        await ws.send(json.dumps({**out, "seq": 1, "data": _b64(b"\x1b[1mhi\x00\xff")}))
        await ws.send(_exit_msg(7))

    async def drive() -> None:
        await asyncio.wait_for(term.wrote.wait(), 5)
        assert term.raw_active
        assert term.on_data is not None and term.on_resize is not None
        term.on_data(b"ls -l\r")
        term.cols, term.rows = 120, 40
        term.on_resize()

    async with api_with_ws(script) as (client, paths):
        driver = asyncio.create_task(drive())
        code = await asyncio.wait_for(run_shell(client, "s1", term), 10)
        await driver
    assert code == 7
    assert paths == ["/api/v1/tunnel/s1/ws?ticket=tk%2B1%2F%3D"]
    assert seen[0] == {"type": "shell", "cols": 100, "rows": 30}
    assert sorted(seen[1:], key=lambda m: str(m["type"])) == [
        {"type": "input", "channel_id": "ch1", "data": _b64(b"ls -l\r")},
        {"type": "resize", "channel_id": "ch1", "cols": 120, "rows": 40},
    ]
    assert bytes(term.output) == b"$ \x1b[1mhi\x00\xff"
    assert term.raw_entered == 1 and not term.raw_active


async def test_shell_killed_by_signal_exits_128_plus_signal() -> None:
    """A shell that died of SIGHUP (exit_code -1) gives 129."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await _recv_json(ws)
        await ws.send(json.dumps({"type": "started", "channel_id": "ch1", "kind": "shell"}))
        await ws.send(_exit_msg(-1))

    async with api_with_ws(script) as (client, _):
        assert await asyncio.wait_for(run_shell(client, "s1", term), 10) == 129


async def test_session_closed_ends_the_shell_with_255_and_a_notice() -> None:
    """session.closed then close 1000 ends the shell with 255 and says why."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await _recv_json(ws)
        await ws.send(json.dumps({"type": "started", "channel_id": "ch1", "kind": "shell"}))
        await ws.send(json.dumps({"type": "session.closed", "reason": "idle_timeout"}))
        await ws.close(1000)

    async with api_with_ws(script) as (client, _):
        assert await asyncio.wait_for(run_shell(client, "s1", term), 10) == 255
    assert any("idle_timeout" in n for n in term.notices)
    assert not term.raw_active


async def test_gap_is_shown_as_a_notice() -> None:
    """A gap message prints the lost-frames notice and the shell goes on."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await _recv_json(ws)
        await ws.send(json.dumps({"type": "started", "channel_id": "ch1", "kind": "shell"}))
        await ws.send(json.dumps({"type": "gap", "channel_id": "ch1", "from_seq": 0, "to_seq": 4}))
        await ws.send(_exit_msg(0))

    async with api_with_ws(script) as (client, _):
        assert await asyncio.wait_for(run_shell(client, "s1", term), 10) == 0
    assert term.notices == ["[gurutunnel: 5 output frames lost]"]


async def test_refused_ticket_close_4401_is_an_auth_error() -> None:
    """Close 4401 right after accept raises AuthError (exit 3); raw mode never entered."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await ws.close(4401, "ticket expired")

    async with api_with_ws(script) as (client, _):
        with pytest.raises(AuthError) as info:
            await asyncio.wait_for(run_shell(client, "s1", term), 10)
    assert "ticket expired" in info.value.message and info.value.exit_code == 3
    assert term.raw_entered == 0


async def test_inactive_session_close_4409_is_a_conflict() -> None:
    """Close 4409 raises ApiError conflict."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await ws.close(4409, "session is closed")

    async with api_with_ws(script) as (client, _):
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(run_shell(client, "s1", term), 10)
    assert info.value.code == "conflict" and "closed" in info.value.message


async def test_error_answer_to_shell_open_raises_its_code() -> None:
    """An error message instead of started raises ApiError with the API's code."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await _recv_json(ws)
        await ws.send(json.dumps({"type": "error", "code": "agent_offline", "message": "gone"}))
        await ws.wait_closed()

    async with api_with_ws(script) as (client, _):
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(run_shell(client, "s1", term), 10)
    assert info.value.render() == "gurutunnel: agent_offline: gone"


async def test_dropped_socket_restores_the_terminal_and_names_the_url_without_ticket() -> None:
    """An abnormal close mid-shell raises NetworkError; raw mode is left; the ticket not shown."""
    term = FakeTerminal()

    async def script(ws: ServerConnection) -> None:
        await _recv_json(ws)
        await ws.send(json.dumps({"type": "started", "channel_id": "ch1", "kind": "shell"}))
        await ws.close(1011, "boom")

    async with api_with_ws(script) as (client, _):
        with pytest.raises(NetworkError) as info:
            await asyncio.wait_for(run_shell(client, "s1", term), 10)
    assert term.raw_entered == 1 and not term.raw_active
    assert "1011" in info.value.message and "tk" not in info.value.render()
