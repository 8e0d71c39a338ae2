"""Gateway hardening against real NATS and real sockets: pathological input, timeouts, races."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gurutunnel_gateway.auth import AgentIdentity
from gurutunnel_gateway.server import Gateway
from gurutunnel_protocol import CloseCode, ErrorCode, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_agent_heartbeat,
    decode_command_result,
    decode_session_up,
    encode,
)
from gurutunnel_protocol.messages import (
    AgentDisconnected,
    CommandFailed,
    DisconnectReason,
    ErrorFrame,
    OutputStream,
    Terminal,
    TerminalChunk,
    TunnelData,
    Welcome,
)

from .agent_client import agent_socket, connect_url, heartbeat, recv_frame, send_frame
from .conftest import StartGateway, wait_presence
from .credentials import mint_agent_credential
from .test_gateway import open_session

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0
NESTED = "[" * 50_000  # deeper than the recursion limit, far under max_frame_bytes


async def closed_code(ws: ClientConnection) -> int | None:
    """Read until the gateway closes the socket; return the close code it sent (bounded)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def test_deeply_nested_frame_gets_error_and_the_next_heartbeat_is_published(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Nested JSON from the agent gets error{malformed_frame}; the socket lives on."""
    agent_id = new_id()
    beats = await nc.subscribe(subjects.agent_events(agent_id, "heartbeat"))
    await nc.flush()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        await ws.send(NESTED)
        frame = await recv_frame(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == ErrorCode.MALFORMED_FRAME
        await send_frame(ws, heartbeat())
        msg = await beats.next_msg(timeout=TIMEOUT_S)
    assert decode_agent_heartbeat(msg.data).agent_id == agent_id


async def test_deeply_nested_command_gets_cmd_failed_at_once(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A bus request carrying nested JSON is answered CommandFailed(malformed_frame) at once."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        msg = await nc.request(subjects.agent_commands(agent_id), NESTED.encode(), timeout=2)
    result = decode_command_result(msg.data)
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.MALFORMED_FRAME


async def test_unanswered_request_gets_agent_timeout(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A request the agent never answers is failed agent_timeout after command_timeout_s."""
    gateway = await start_gateway(command_timeout_s=0.2, sweep_interval_s=0.05)
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        req = Terminal(req_id=new_id(), session_id=new_id(), channel_id="c", command="id")
        started = time.monotonic()
        msg = await nc.request(subjects.agent_commands(agent_id), encode(req), timeout=3)
        elapsed = time.monotonic() - started
        assert await recv_frame(ws) == req  # it did reach the agent
    result = decode_command_result(msg.data)
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_TIMEOUT
    assert 0.15 <= elapsed < 2.0


async def test_two_authorization_headers_get_401_json(gateway: Gateway, agent_key: Key) -> None:
    """A repeated Authorization header is refused 401 with the JSON error body, not a 500."""
    token = mint_agent_credential(agent_key[0], new_id())
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            connect_url(gateway.port), additional_headers=headers, open_timeout=TIMEOUT_S
        ):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body)["error"]["code"] == ErrorCode.UNAUTHORIZED


async def test_revocation_between_verify_and_registration_closes_4501(
    gateway: Gateway,
    agent_key: Key,
    nc: NATS,
    subjects: Subjects,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A revocation handled after the credential check but before registration still closes."""
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id, iat=int(time.time()) - 60)
    verify = gateway.verifier.verify

    def verify_then_revoke(credential: str) -> AgentIdentity:
        identity = verify(credential)
        # the revocation watch delivers now: no live connection of the agent exists yet
        gateway._on_revocation(agent_id, datetime.now(UTC).isoformat().encode())
        return identity

    monkeypatch.setattr(gateway.verifier, "verify", verify_then_revoke)
    async with agent_socket(gateway.port, token) as ws:
        assert await closed_code(ws) == CloseCode.REVOKED
    event, _ = await wait_presence(nc, subjects, agent_id, event_type="presence.disconnected")
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.REVOKED


async def test_frames_over_the_rate_limit_are_refused_and_sustained_abuse_closes_4003(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Past the burst, frames get error{rate_limited} and are dropped; a flood closes 4003."""
    gateway = await start_gateway(max_frames_per_s=0.5, frame_burst=2, max_consecutive_errors=5)
    agent_id = new_id()
    beats = await nc.subscribe(subjects.agent_events(agent_id, "heartbeat"))
    await nc.flush()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        for _ in range(3):
            await send_frame(ws, heartbeat())
        frame = await recv_frame(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == ErrorCode.RATE_LIMITED
        for _ in range(2):
            await beats.next_msg(timeout=TIMEOUT_S)  # the burst went through
        for _ in range(4):
            await send_frame(ws, heartbeat())
        assert await closed_code(ws) == CloseCode.TOO_MANY_ERRORS
    assert beats.pending_msgs == 0  # nothing beyond the burst was published


async def test_session_data_is_never_dropped_by_the_control_frame_limit(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Far more data frames than the control-frame limit allows all arrive, in order."""
    gateway = await start_gateway(max_frames_per_s=0.5, frame_burst=2, max_consecutive_errors=5)
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        up = await nc.subscribe(subjects.session_up(session_id))
        await nc.flush()
        for i in range(60):
            chunk = TerminalChunk(
                session_id=session_id,
                channel_id="c1",
                seq=i,
                stream=OutputStream.STDOUT,
                data=f"line {i}\n".encode(),
            )
            await send_frame(ws, chunk)
        seqs = []
        for _ in range(60):
            msg = await up.next_msg(timeout=TIMEOUT_S)
            frame = decode_session_up(msg.data).frame
            assert isinstance(frame, TerminalChunk)
            seqs.append(frame.seq)
        assert seqs == list(range(60))


async def test_bytes_over_the_read_budget_are_slowed_not_dropped(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Past the byte budget the gateway reads more slowly; every frame still arrives."""
    rate, burst, frame_bytes, count = 400_000, 64_000, 48_000, 12
    gateway = await start_gateway(max_read_bytes_per_s=rate, read_burst_bytes=burst)
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        up = await nc.subscribe(subjects.session_up(session_id))
        await nc.flush()
        started = time.monotonic()
        for i in range(count):
            await send_frame(
                ws,
                TunnelData(session_id=session_id, channel_id="c1", data=bytes([i]) * frame_bytes),
            )
        received = [
            decode_session_up((await up.next_msg(timeout=TIMEOUT_S)).data).frame
            for _ in range(count)
        ]
        elapsed = time.monotonic() - started
    assert [f.data[0] for f in received if isinstance(f, TunnelData)] == list(range(count))
    # base64 makes each frame ~4/3 of its data; the budget cannot be beaten, only met
    wire_bytes = count * frame_bytes * 4 / 3
    assert elapsed >= (wire_bytes - burst) / rate * 0.9


async def test_client_that_never_finishes_the_handshake_is_dropped_within_open_timeout(
    start_gateway: StartGateway,
) -> None:
    """A TCP client that sends half an upgrade request and then nothing is disconnected by the
    gateway once open_timeout_s has passed (a slowloris cannot hold a socket for ever)."""
    open_timeout_s = 0.5
    gateway = await start_gateway(open_timeout_s=open_timeout_s)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        # request line and one header; the blank line that ends the headers never comes
        writer.write(b"GET /agent/v1/connect HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        started = time.monotonic()
        try:
            # read() returns only at EOF; EOF or a reset means the gateway dropped us, and the
            # bound turns a gateway that keeps the socket into a TimeoutError
            rest = await asyncio.wait_for(reader.read(), open_timeout_s + TIMEOUT_S)
        except ConnectionResetError:
            rest = b""
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert not rest.startswith(b"HTTP/1.1 101"), rest  # never upgraded
    assert elapsed < open_timeout_s + 3.0
