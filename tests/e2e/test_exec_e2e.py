"""Work inside a session end to end: REST exec, NDJSON and the WebSocket through the real API,
gateway and agent processes on real NATS (SQLite and PostgreSQL), running real commands; the
session limits (idle timeout, maximum duration) on a second stack with short limits; a command
whose audit row cannot be written never runs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from devstack.processes import ManagedProcess
from devstack.stack import API_PREFIX, EnrolledAgent, Stack
from tests.e2e.conftest import E2E_API_ENV, api_client, module_stack, new_admin_token

pytestmark = pytest.mark.slow

TEN_MB_COMMAND = ["seq", "-f", "%09.0f", "1", "1000000"]
"""Prints 1..1000000 as 9 digits and a newline: exactly 10,000,000 bytes."""


def _ten_mb() -> bytes:
    return b"".join(b"%09d\n" % i for i in range(1, 1000001))


IDLE_S = 2.0
MAX_S = 6.0
"""Short session limits of the second stack: the idle test ends long before MAX_S; the
max-duration test keeps the session busy (an exec every EXEC_EVERY_S) so idling never ends it."""
EXEC_EVERY_S = 0.4
LIMITS_API_ENV = {
    **E2E_API_ENV,
    "GT_API_SESSION_IDLE_TIMEOUT_S": str(IDLE_S),
    "GT_API_SESSION_MAX_DURATION_S": str(MAX_S),
    "GT_API_SESSION_REAP_INTERVAL_S": "0.2",
    "GT_API_SESSION_WATCH_INTERVAL_S": "0.2",
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def limits_stack(
    request: pytest.FixtureRequest, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A second stack whose API closes sessions after IDLE_S idle or MAX_S in all."""
    with module_stack(
        request, nats_url, tmp_path_factory, name="limits-stack", api_env=LIMITS_API_ENV
    ) as s:
        yield s


def _admin_client(stack: Stack) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    """An HTTP client of a fresh admin of ``stack`` (admins may read the audit)."""
    return api_client(stack, new_admin_token(stack))


@pytest.fixture(scope="module")
def admin(stack: Stack) -> tuple[str, str]:
    username = f"admin{secrets.token_hex(3)}"
    return username, stack.create_admin(username)


@pytest.fixture
async def client(stack: Stack, admin: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack, stack.token(*admin)) as c:
        yield c


async def _wait_online(client: httpx.AsyncClient, agent_id: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get(f"/agents/{agent_id}")
        if r.status_code == 200 and r.json()["online"] is True:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent {agent_id} not online within {timeout_s}s")


@contextlib.asynccontextmanager
async def _open_session(stack: Stack, client: httpx.AsyncClient) -> AsyncIterator[str]:
    """Enrol and start a real agent process, open a session on it; the agent stops after."""
    r = await client.post("/agents", json={"name": f"agent-{secrets.token_hex(3)}"})
    assert r.status_code == 201, r.text
    body = r.json()
    agent = EnrolledAgent(
        id=body["agent"]["id"], name=body["agent"]["name"], credential=body["credential"]
    )
    proc: ManagedProcess = stack.start_agent(agent)
    try:
        await _wait_online(client, agent.id)
        r = await client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 201, r.text
        yield str(r.json()["id"])
    finally:
        proc.stop()


@pytest.fixture
async def session(stack: Stack, client: httpx.AsyncClient) -> AsyncIterator[str]:
    """An active session on a real agent process."""
    async with _open_session(stack, client) as session_id:
        yield session_id


async def _exec(client: httpx.AsyncClient, session: str, **body: Any) -> dict[str, Any]:
    r = await client.post(f"/tunnel/{session}/exec", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_echo_and_exit_codes_0_1_127_with_stdout_and_stderr_apart(
    client: httpx.AsyncClient, session: str
) -> None:
    """echo prints; exit 1 is 1; an unknown command through the shell is 127; streams apart."""
    r = await _exec(client, session, argv=["echo", "hello world"])
    assert (r["stdout"], r["stderr"], r["exit_code"], r["reason"]) == (
        "hello world\n",
        "",
        0,
        "exited",
    )
    assert (await _exec(client, session, command="exit 1"))["exit_code"] == 1
    r = await _exec(client, session, command="nosuchcmd-xyz")
    assert r["exit_code"] == 127 and "nosuchcmd-xyz" in r["stderr"]
    r = await _exec(client, session, command="echo out; echo err >&2")
    assert (r["stdout"], r["stderr"]) == ("out\n", "err\n")
    assert (r["stdout_bytes"], r["stderr_bytes"], r["gaps"]) == (4, 4, [])


async def test_ten_megabytes_arrive_complete_and_in_order_over_rest_and_ndjson(
    client: httpx.AsyncClient, session: str
) -> None:
    """10 MB of output: the full result and the NDJSON chunks hash like the expected bytes."""
    expected = hashlib.sha256(_ten_mb()).hexdigest()
    resp = await client.post(
        f"/tunnel/{session}/exec", json={"argv": TEN_MB_COMMAND}, params={"encoding": "base64"}
    )
    assert resp.status_code == 200, resp.text
    r = resp.json()
    data = base64.b64decode(r["stdout"])
    assert (len(data), r["stdout_bytes"], r["truncated"], r["gaps"]) == (
        10_000_000,
        10_000_000,
        False,
        [],
    )
    assert hashlib.sha256(data).hexdigest() == expected

    digest, seqs = hashlib.sha256(), []
    async with client.stream(
        "POST", f"/tunnel/{session}/exec", json={"argv": TEN_MB_COMMAND}, params={"stream": "true"}
    ) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            if event["event"] == "chunk":
                seqs.append(event["seq"])
                digest.update(base64.b64decode(event["data"]))
            assert event["event"] not in ("gap", "error"), event
    assert seqs == list(range(len(seqs))) and digest.hexdigest() == expected


async def _ws(stack: Stack, client: httpx.AsyncClient, session: str) -> ClientConnection:
    r = await client.post(f"/tunnel/{session}/ws-ticket")
    assert r.status_code == 201, r.text
    url = f"{stack.api_url.replace('http://', 'ws://')}{API_PREFIX}/tunnel/{session}/ws"
    return await connect(f"{url}?ticket={r.json()['ticket']}", max_size=8 * 1024 * 1024)


async def _next(ws: ClientConnection, timeout_s: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        msg: dict[str, Any] = json.loads(await ws.recv())
        return msg


async def _read_exec(ws: ClientConnection, stdout_bytes: int) -> hashlib._Hash:
    """Chunks until the exit of the socket's one command, asserting seq order, no gap and no
    error, exit 0 with ``stdout_bytes``; the SHA-256 of the output."""
    digest, expected_seq = hashlib.sha256(), 0
    while True:
        msg = await _next(ws)
        assert msg["type"] not in ("gap", "error"), msg
        if msg["type"] == "chunk":
            assert msg["seq"] == expected_seq
            expected_seq += 1
            digest.update(base64.b64decode(msg["data"]))
        elif msg["type"] == "exit":
            assert msg["exit_code"] == 0 and msg["stdout_bytes"] == stdout_bytes
            return digest


async def test_ten_megabytes_arrive_complete_and_in_order_over_the_websocket(
    stack: Stack, client: httpx.AsyncClient, session: str
) -> None:
    """The same 10 MB through the WebSocket: chunks in seq order, no gap, same SHA-256."""
    expected = hashlib.sha256(_ten_mb()).hexdigest()
    ws = await _ws(stack, client, session)
    try:
        await ws.send(json.dumps({"type": "exec", "argv": TEN_MB_COMMAND, "id": "big"}))
        assert (await _read_exec(ws, 10_000_000)).hexdigest() == expected
    finally:
        await ws.close()


THIRTY_MB_COMMAND = ["seq", "-f", "%09.0f", "1", "3000000"]


async def test_a_reader_who_pauses_loses_nothing_and_is_not_dropped(
    stack: Stack, client: httpx.AsyncClient, session: str
) -> None:
    """30 MB of output while the technician stops reading for 2 s first: far more than the
    socket's queue (1 MiB) and the kernel's buffers hold. Output flow control makes the agent
    wait for the reader, so every chunk arrives in order, no gap, no 1013."""
    expected = hashlib.sha256(b"".join(b"%09d\n" % i for i in range(1, 3000001))).hexdigest()
    ws = await _ws(stack, client, session)
    try:
        await ws.send(json.dumps({"type": "exec", "argv": THIRTY_MB_COMMAND, "id": "big"}))
        await asyncio.sleep(2.0)
        assert (await _read_exec(ws, 30_000_000)).hexdigest() == expected
    finally:
        await ws.close()


async def test_an_ndjson_reader_who_pauses_loses_nothing(
    client: httpx.AsyncClient, session: str
) -> None:
    """The same 30 MB as NDJSON, the client reading nothing for 2 s first: about 40 MB of
    base64, more than the API's session subscription buffers (32 MiB). The API acknowledges
    a chunk only once its line was written, so the agent waits: every chunk, in order, no
    gap, the same SHA-256."""
    expected = hashlib.sha256(b"".join(b"%09d\n" % i for i in range(1, 3000001))).hexdigest()
    digest, seqs = hashlib.sha256(), []
    async with client.stream(
        "POST",
        f"/tunnel/{session}/exec",
        json={"argv": THIRTY_MB_COMMAND},
        params={"stream": "true"},
    ) as stream:
        await asyncio.sleep(2.0)
        async for line in stream.aiter_lines():
            event = json.loads(line)
            assert event["event"] not in ("gap", "error"), event
            if event["event"] == "chunk":
                seqs.append(event["seq"])
                digest.update(base64.b64decode(event["data"]))
            elif event["event"] == "exit":
                assert event["exit_code"] == 0 and event["stdout_bytes"] == 30_000_000
    assert seqs == list(range(len(seqs))) and digest.hexdigest() == expected


async def test_timeout_kills_the_whole_process_tree(
    client: httpx.AsyncClient, session: str
) -> None:
    """A command past its timeout_s ends with reason timeout and its background child is gone."""
    r = await _exec(client, session, command="sleep 300 & echo $!; wait", timeout_s=1.0)
    assert r["reason"] == "timeout", r
    child = int(r["stdout"].strip())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"child {child} of the timed-out command still runs")


async def test_cancel_ends_a_running_command_with_cancelled(
    client: httpx.AsyncClient, session: str
) -> None:
    """POST .../cancel on a streaming sleep: the exit event says cancelled within seconds."""
    events: list[dict[str, Any]] = []
    async with client.stream(
        "POST", f"/tunnel/{session}/exec", json={"command": "sleep 60"}, params={"stream": "true"}
    ) as stream:
        lines = stream.aiter_lines()
        events.append(json.loads(await anext(lines)))
        assert events[0]["event"] == "started"
        r = await client.post(f"/tunnel/{session}/exec/{events[0]['channel_id']}/cancel")
        assert r.status_code == 202
        async with asyncio.timeout(15):
            async for line in lines:
                events.append(json.loads(line))
    assert events[-1]["event"] == "exit" and events[-1]["reason"] == "cancelled"


async def test_client_that_goes_away_cancels_its_command(
    client: httpx.AsyncClient, session: str
) -> None:
    """Dropping the NDJSON connection mid-command cancels it; the audit row ends cancelled."""
    async with client.stream(
        "POST", f"/tunnel/{session}/exec", json={"command": "sleep 60"}, params={"stream": "true"}
    ) as stream:
        started = json.loads(await anext(stream.aiter_lines()))
    channel = started["channel_id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = await client.get("/audit", params={"session_id": session, "action": "command.run"})
        [row] = [x for x in r.json()["data"] if x["channel_id"] == channel]
        if row["ended_at"] is not None:
            assert row["reason"] == "cancelled", row
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the abandoned command was not cancelled")


async def test_output_cap_truncates_and_flags_it(client: httpx.AsyncClient, session: str) -> None:
    """max_output_bytes=1000 on ~600 KB of output: 1000 bytes kept, truncated, all counted."""
    r = await _exec(client, session, argv=["seq", "100000"], max_output_bytes=1000)
    assert r["truncated"] is True and len(r["stdout"]) == 1000
    assert r["stdout_bytes"] == len(b"".join(b"%d\n" % i for i in range(1, 100001)))


async def test_cwd_outside_the_allowlist_is_refused(
    client: httpx.AsyncClient, session: str
) -> None:
    """cwd /etc (outside the agent's allowlist) is 422 cwd_not_allowed and nothing runs."""
    r = await client.post(f"/tunnel/{session}/exec", json={"argv": ["ls"], "cwd": "/etc"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "cwd_not_allowed"


async def test_pty_shell_echoes_input_and_reports_the_resized_size(
    stack: Stack, client: httpx.AsyncClient, session: str
) -> None:
    """A WebSocket shell: typed input is echoed, and `stty size` answers the resized rows cols."""
    ws = await _ws(stack, client, session)
    try:
        await ws.send(json.dumps({"type": "shell", "cols": 80, "rows": 24}))
        started = await _next(ws)
        while started["type"] != "started":
            started = await _next(ws)
        channel = started["channel_id"]
        await ws.send(
            json.dumps({"type": "resize", "channel_id": channel, "cols": 133, "rows": 41})
        )
        typed = base64.b64encode(b"echo marker-$((6*7)); stty size\r").decode()
        await ws.send(json.dumps({"type": "input", "channel_id": channel, "data": typed}))
        seen = b""
        async with asyncio.timeout(20):
            while b"41 133" not in seen or b"marker-42" not in seen:
                msg = await _next(ws)
                if msg["type"] == "chunk":
                    seen += base64.b64decode(msg["data"])
        assert b"echo marker-$((6*7))" in seen, "input is echoed by the PTY"
        await ws.send(json.dumps({"type": "cancel", "channel_id": channel}))
        while (msg := await _next(ws))["type"] != "exit":
            pass
        assert msg["channel_id"] == channel
    finally:
        await ws.close()


# ---------------------------------------------------------------- audit before send
async def test_command_whose_audit_row_cannot_be_written_is_not_run(
    stack: Stack, client: httpx.AsyncClient, session: str, tmp_path: Path
) -> None:
    """tunnel_audit unwritable: exec `touch` is 503 database_unavailable and the file never
    appears; the same exec once the table is back does create it (so the check can fail)."""
    target = tmp_path / f"ran-{secrets.token_hex(4)}"
    command = f"touch {shlex.quote(str(target))}"
    engine = create_async_engine(
        stack.database_url,
        connect_args={"timeout": 10} if stack.database_url.startswith("sqlite") else {},
    )
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE tunnel_audit RENAME TO tunnel_audit_away"))
        try:
            r = await client.post(f"/tunnel/{session}/exec", json={"command": command})
        finally:
            async with engine.begin() as conn:
                await conn.execute(sa.text("ALTER TABLE tunnel_audit_away RENAME TO tunnel_audit"))
    finally:
        await engine.dispose()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "database_unavailable"
    await asyncio.sleep(1.5)  # a command that went out would have run within this bound
    assert not target.exists(), "the command ran although its audit row was never written"
    r2 = await _exec(client, session, command=command)
    assert (r2["exit_code"], target.exists()) == (0, True)


# ---------------------------------------------------------------- session limits
async def _closed_code(ws: ClientConnection, timeout_s: float = 10) -> int | None:
    """Read until the API closes the socket (bounded); the close code it sent."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def _assert_closed_by(client: httpx.AsyncClient, session: str, reason: str) -> None:
    """Status says closed with ``reason``; exactly one session.close audit row, by the system."""
    r = await client.get(f"/tunnel/status/{session}")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["close_reason"]) == ("closed", reason), r.json()
    r = await client.get("/audit", params={"session_id": session, "action": "session.close"})
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert [(row["reason"], row["actor"]) for row in rows] == [(reason, "system")], rows


async def test_idle_session_closes_idle_timeout_audited_and_the_websocket_hears_it(
    limits_stack: Stack,
) -> None:
    """No user traffic (pings do not count) for IDLE_S: the session closes idle_timeout, one
    audit row, and the technician's WebSocket gets session.closed{idle_timeout} then 1000."""
    async with (
        _admin_client(limits_stack) as client,
        _open_session(limits_stack, client) as session,
    ):
        opened = time.monotonic()
        ws = await _ws(limits_stack, client, session)
        try:
            for _ in range(3):  # pings are not user traffic: they must not keep it open
                await ws.send(json.dumps({"type": "ping"}))
                assert (await _next(ws))["type"] == "pong"
            deadline = opened + IDLE_S + 20
            msg = await _next(ws, timeout_s=deadline - time.monotonic())
            while msg["type"] != "session.closed":
                msg = await _next(ws, timeout_s=deadline - time.monotonic())
            elapsed = time.monotonic() - opened
            assert msg == {"type": "session.closed", "reason": "idle_timeout"}
            assert await _closed_code(ws) == 1000
        finally:
            await ws.close()
        assert elapsed >= IDLE_S - 1.0, elapsed
        await _assert_closed_by(client, session, "idle_timeout")


async def test_busy_session_still_closes_at_max_duration_audited_and_the_websocket_hears_it(
    limits_stack: Stack,
) -> None:
    """Commands every EXEC_EVERY_S keep idling away; at MAX_S the session closes max_duration,
    one audit row, and the WebSocket gets session.closed{max_duration} then 1000."""
    async with (
        _admin_client(limits_stack) as client,
        _open_session(limits_stack, client) as session,
    ):
        opened = time.monotonic()
        ws = await _ws(limits_stack, client, session)
        exits = 0
        try:
            deadline = opened + MAX_S + 30
            next_exec = 0.0
            while True:
                now = time.monotonic()
                assert now < deadline, "no session.closed within MAX_S + 30 s"
                if now >= next_exec:
                    # the API may close the socket between two sends: what it sent before is
                    # still read below
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(json.dumps({"type": "exec", "argv": ["true"]}))
                    next_exec = now + EXEC_EVERY_S
                try:
                    msg = await _next(ws, timeout_s=max(0.05, next_exec - time.monotonic()))
                except TimeoutError:
                    continue
                if msg["type"] == "session.closed":
                    break
                if msg["type"] == "exit":
                    exits += 1
            elapsed = time.monotonic() - opened
            assert msg == {"type": "session.closed", "reason": "max_duration"}
            assert await _closed_code(ws) == 1000
        finally:
            await ws.close()
        assert elapsed >= MAX_S - 1.0, elapsed
        # the session was in use all along: well past IDLE_S of commands that ran
        assert exits >= (MAX_S - IDLE_S) / EXEC_EVERY_S / 2, exits
        await _assert_closed_by(client, session, "max_duration")
