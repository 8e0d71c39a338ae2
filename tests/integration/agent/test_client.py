"""Integration tests of the agent's connect loop against a real websockets server (fake gateway)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from gurutunnel_agent.client import FatalRefusal
from gurutunnel_agent.tunnel import TunnelMode
from gurutunnel_protocol import CloseCode, ErrorCode
from gurutunnel_protocol.envelope import encode
from gurutunnel_protocol.messages import (
    Heartbeat,
    Reconnect,
    TunnelClose,
    TunnelClosed,
    TunnelError,
    TunnelOpen,
    TunnelReady,
)
from tests.integration.agent.conftest import RunningAgent
from tests.integration.agent.fake_gateway import GOOD_CREDENTIAL, FakeGateway

StartAgent = Callable[..., RunningAgent]


async def test_heartbeat_arrives_after_welcome_with_host_metrics(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """The credential travels in the header only; a heartbeat with metrics follows welcome."""
    start_agent()
    await gateway.next_connection()
    _, beat = await gateway.next_frame(Heartbeat)
    assert gateway.auth_headers == [f"Bearer {GOOD_CREDENTIAL}"]
    assert GOOD_CREDENTIAL not in gateway.paths[0]
    assert beat.mode == "heartbeat"
    assert beat.session_id is None
    assert beat.metrics.hostname == socket.gethostname()[:255]
    assert beat.metrics.cpu_count >= 1
    assert beat.metrics.mem_total_bytes > 0
    # heartbeats keep coming at the gateway's interval (0.1 s), not the agent's 30 s
    await gateway.next_frame(Heartbeat, timeout_s=2.0)


async def test_tunnel_open_and_close_switch_modes_on_the_same_connection(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """open -> ready (same req_id), busy on a second open, close -> closed, same socket."""
    agent = start_agent()
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    agent_side = agent.client.connection
    assert agent_side is not None

    await gateway.send(ws, TunnelOpen(req_id="req1", session_id="s1", tech_id="tech1"))
    _, ready = await gateway.next_frame(TunnelReady)
    assert (ready.req_id, ready.session_id) == ("req1", "s1")
    _, beat = await gateway.next_frame(Heartbeat)
    assert (beat.mode, beat.session_id) == ("tunnel", "s1")

    await gateway.send(ws, TunnelOpen(req_id="req2", session_id="s2", tech_id="tech2"))
    _, busy = await gateway.next_frame(TunnelError)
    assert (busy.code, busy.req_id) == (ErrorCode.TUNNEL_BUSY, "req2")

    await gateway.send(ws, TunnelClose(req_id="req3", session_id="s1"))
    _, closed = await gateway.next_frame(TunnelClosed)
    assert (closed.req_id, closed.session_id) == ("req3", "s1")
    _, beat = await gateway.next_frame(Heartbeat)
    assert (beat.mode, beat.session_id) == ("heartbeat", None)

    assert agent.client.connection is agent_side
    assert len(gateway.connections) == 1
    assert agent.client.connections_made == 1


async def test_reconnects_after_the_server_drops_the_socket_and_tunnel_is_force_closed(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """An abrupt drop (no close frame) ends the session; the agent reconnects in heartbeat mode."""
    agent = start_agent()
    first = await gateway.next_connection()
    await gateway.send(first, TunnelOpen(req_id="r1", session_id="s1", tech_id="t1"))
    await gateway.next_frame(TunnelReady)
    assert agent.client.tunnel.session_id == "s1"

    first.transport.abort()
    second = await gateway.next_connection()
    assert second is not first
    conn, beat = await gateway.next_frame(Heartbeat)
    while conn is not second:  # skip a heartbeat the first socket may have delivered late
        conn, beat = await gateway.next_frame(Heartbeat)
    assert (beat.mode, beat.session_id) == ("heartbeat", None)
    assert agent.client.tunnel.mode is TunnelMode.HEARTBEAT
    assert agent.client.tunnel.session_id is None
    assert agent.client.connections_made == 2


@pytest.mark.parametrize(
    ("status", "code"), [(401, "unauthorized"), (403, "forbidden")], ids=["401", "403"]
)
async def test_refusal_at_the_upgrade_is_fatal_and_not_retried(
    gateway: FakeGateway, start_agent: StartAgent, status: int, code: str
) -> None:
    """HTTP 401/403 at the upgrade ends run() with FatalRefusal naming the status; one attempt."""
    gateway.refuse_status = status
    agent = start_agent()
    with pytest.raises(FatalRefusal) as info:
        await asyncio.wait_for(agent.task, 5)
    assert info.value.reason == f"credential refused by gateway (HTTP {status} {code})"
    assert len(gateway.auth_headers) == 1
    assert gateway.connections == []


async def test_wrong_credential_is_refused_with_401(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """A credential the gateway does not accept stops the agent with the 401 reason."""
    agent = start_agent(credential="not-the-right-one")
    with pytest.raises(FatalRefusal, match=r"HTTP 401 unauthorized"):
        await asyncio.wait_for(agent.task, 5)
    assert gateway.auth_headers == ["Bearer not-the-right-one"]


async def test_gateway_unavailable_status_is_retried(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """HTTP 503 at the upgrade is transient: the agent retries and connects once it is lifted."""
    gateway.refuse_status = 503
    agent = start_agent()
    async with asyncio.timeout(5):
        while len(gateway.auth_headers) < 2:
            await asyncio.sleep(0.01)
    gateway.refuse_status = None
    await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    assert not agent.task.done()


async def test_revoked_close_code_stops_the_agent(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """Close code 4501 (give-up range) ends run() with FatalRefusal; no reconnect."""
    agent = start_agent()
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await ws.close(CloseCode.REVOKED, "agent revoked")
    with pytest.raises(FatalRefusal) as info:
        await asyncio.wait_for(agent.task, 5)
    assert "code 4501 (revoked" in info.value.reason
    assert len(gateway.connections) == 1


async def test_reconnect_range_close_code_reconnects(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """Close code 4000 (replaced, reconnect range) is retried: a second connection follows."""
    agent = start_agent()
    ws = await gateway.next_connection()
    await ws.close(CloseCode.REPLACED, "replaced")
    await gateway.next_connection()
    assert not agent.task.done()


async def test_reconnect_frame_delay_is_honoured(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """reconnect{delay_ms} closes with 1000 and the next upgrade comes after that delay."""
    # the backoff (reset after each welcome) is 0.01 s, so only delay_ms explains the wait
    agent = start_agent(backoff_initial_s=0.01, backoff_max_s=5.0, backoff_jitter=False)
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await gateway.send(ws, Reconnect(delay_ms=300, reason="draining"))
    _, code, ended_at = await gateway.next_end()
    assert code == CloseCode.NORMAL
    second = await gateway.next_connection(timeout_s=3)
    elapsed = asyncio.get_running_loop().time() - ended_at
    assert second is not ws
    assert 0.25 <= elapsed < 2.0
    conn, _ = await gateway.next_frame(Heartbeat)
    while conn is not second:
        conn, _ = await gateway.next_frame(Heartbeat)
    assert agent.client.connections_made == 2


async def test_malformed_frames_do_not_kill_the_loop(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """Garbage, unknown types, bad versions and binary noise are skipped; the socket stays."""
    start_agent()
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    for junk in (
        "not json",
        "[1, 2]",
        '{"type": "no.such.type"}',
        '{"type": "tunnel.open", "v": 99, "session_id": "s1", "tech_id": "t"}',
        '{"type": "tunnel.open", "session_id": "bad id!", "tech_id": "t"}',
    ):
        await ws.send(junk)
    await ws.send(b"\x00\xff\x10binary")
    # version 1 is text only: even a well-formed frame in a binary message is not acted on
    await ws.send(encode(TunnelOpen(req_id="rb", session_id="sb", tech_id="t1")))
    await gateway.send(ws, TunnelOpen(req_id="r1", session_id="s1", tech_id="t1"))
    conn, ready = await gateway.next_frame(TunnelReady)
    assert conn is ws
    assert ready.req_id == "r1"
    assert len(gateway.connections) == 1


async def test_missing_welcome_closes_and_reconnects(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """Without a welcome within welcome_timeout_s the agent closes (1002) and tries again."""
    gateway.send_welcome = False
    start_agent(welcome_timeout_s=0.2)
    first = await gateway.next_connection()
    ws, code, _ = await gateway.next_end()
    assert ws is first
    assert code == CloseCode.PROTOCOL_ERROR
    await gateway.next_connection()
    assert gateway.received.empty()  # no heartbeat before a welcome


async def test_stop_closes_with_1000_and_returns(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """stop() closes the socket with code 1000 and run() returns without reconnecting."""
    agent = start_agent()
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await agent.stop()
    ended, code, _ = await gateway.next_end()
    assert (ended, code) == (ws, CloseCode.NORMAL)
    assert len(gateway.connections) == 1


async def test_half_open_link_is_detected_by_ping_timeout_and_reconnected(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """A gateway that stops reading (no pong) is dropped within ping interval + timeout."""
    agent = start_agent(ping_interval_s=0.2, ping_timeout_s=0.2)
    first = await gateway.next_connection()
    await gateway.send(first, TunnelOpen(req_id="r1", session_id="s1", tech_id="t1"))
    await gateway.next_frame(TunnelReady)
    first.transport.pause_reading()  # pings pile up unanswered, as on a dead link
    second = await gateway.next_connection(timeout_s=3)
    assert second is not first
    conn, beat = await gateway.next_frame(Heartbeat)
    while conn is not second:
        conn, beat = await gateway.next_frame(Heartbeat)
    assert (beat.mode, beat.session_id) == ("heartbeat", None)
    assert agent.client.connections_made == 2
    first.transport.abort()


async def test_rotated_credential_file_is_used_on_reconnect(
    gateway: FakeGateway, start_agent: StartAgent, tmp_path: Path
) -> None:
    """The credential file is re-read at each attempt, so rotation needs no restart."""
    path = tmp_path / "credential"
    path.write_text(GOOD_CREDENTIAL + "\n")
    start_agent(credential=None, credential_file=path)
    first = await gateway.next_connection()
    gateway.credential = "rotated-credential"
    path.write_text("rotated-credential")
    await first.close(CloseCode.GOING_AWAY)
    await gateway.next_connection()
    assert gateway.auth_headers == [f"Bearer {GOOD_CREDENTIAL}", "Bearer rotated-credential"]


async def test_stop_while_connecting_returns_promptly(start_agent: StartAgent) -> None:
    """stop() during a handshake that never completes ends run() without waiting it out."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keep the socket open and never answer the upgrade
        accepted.set()

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        agent = start_agent(gateway_url=f"ws://127.0.0.1:{port}/x", open_timeout_s=30)
        await asyncio.wait_for(accepted.wait(), 5)  # the handshake is now in progress
        started = asyncio.get_running_loop().time()
        await agent.stop(timeout_s=5)
        assert asyncio.get_running_loop().time() - started < 2
        assert agent.client.connections_made == 0
    finally:
        for writer in held:
            writer.close()
        silent.close()
