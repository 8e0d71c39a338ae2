"""The gateway in-process against real NATS, with real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.error import HTTPError

import jwt
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gurutunnel_gateway.server import Gateway
from gurutunnel_protocol import CloseCode, ErrorCode, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_agent_heartbeat,
    decode_command_result,
    decode_gateway_heartbeat,
    decode_session_up,
    encode,
)
from gurutunnel_protocol.messages import (
    AgentConnected,
    AgentDisconnected,
    CommandFailed,
    CommandReply,
    DisconnectReason,
    ErrorFrame,
    Terminal,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelOpen,
    TunnelReady,
    Welcome,
)

from .agent_client import agent_socket, connect_url, heartbeat, recv_frame, send_frame
from .conftest import StartGateway, wait_presence
from .credentials import agent_claims, generate_agent_key, mint_agent_credential

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0


async def refused_status(port: int, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    """Attempt an upgrade that must be refused; return the HTTP status and JSON body."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(connect_url(port), additional_headers=headers, open_timeout=TIMEOUT_S):
            pass
    response = info.value.response
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body)


async def closed_code(ws: ClientConnection) -> int | None:
    """Read until the gateway closes the socket; return the close code it sent (bounded)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def welcomed(ws: ClientConnection) -> Welcome:
    frame = await recv_frame(ws)
    assert isinstance(frame, Welcome)
    return frame


def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S) as r:
            return int(r.status), json.loads(r.read())
    except HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "case",
    ["missing", "not_bearer", "tampered", "expired", "hs256", "alg_none", "tech_token", "no_exp"],
)
async def test_bad_credential_gets_401_and_no_socket(
    gateway: Gateway, agent_key: Key, case: str
) -> None:
    """Missing, tampered, expired, wrong-alg and technician credentials are refused with 401."""
    private_key, _ = agent_key
    agent_id = new_id()
    good = mint_agent_credential(private_key, agent_id)
    tokens: dict[str, str] = {
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "expired": mint_agent_credential(
            private_key, agent_id, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600
        ),
        "hs256": jwt.encode(agent_claims(agent_id), "a-shared-secret-of-32-bytes-long!", "HS256"),
        "alg_none": jwt.encode(agent_claims(agent_id), "", algorithm="none"),
        "tech_token": mint_agent_credential(
            private_key, agent_id, typ="tech", aud="gurutunnel-api", role="admin"
        ),
        "no_exp": mint_agent_credential(private_key, agent_id, exp=None),
    }
    headers = {
        "missing": {},
        "not_bearer": {"Authorization": f"Basic {good}"},
    }.get(case, {"Authorization": f"Bearer {tokens.get(case, '')}"})
    status, body = await refused_status(gateway.port, headers)
    assert status == 401
    assert body["error"]["code"] == ErrorCode.UNAUTHORIZED  # type: ignore[index]
    assert gateway.hub.agent_count == 0


async def test_credential_signed_by_another_key_gets_401(gateway: Gateway) -> None:
    """A well-formed EdDSA credential from a key the gateway does not trust is refused."""
    other_key, _ = generate_agent_key()
    token = mint_agent_credential(other_key, new_id())
    status, _ = await refused_status(gateway.port, {"Authorization": f"Bearer {token}"})
    assert status == 401


async def test_revoked_agent_gets_403(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A credential issued before the agent's revocation not_before is refused with 403."""
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id, iat=int(time.time()) - 60)
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=subjects.revocation_bucket)
    await kv.put(agent_id, (datetime.now(UTC) - timedelta(seconds=30)).isoformat().encode())
    gateway = await start_gateway()  # loads the snapshot before it accepts anything
    status, body = await refused_status(gateway.port, {"Authorization": f"Bearer {token}"})
    assert status == 403
    assert body["error"]["code"] == ErrorCode.FORBIDDEN  # type: ignore[index]
    newer = mint_agent_credential(agent_key[0], agent_id)  # issued after not_before
    async with agent_socket(gateway.port, newer) as ws:
        await welcomed(ws)


# ---------------------------------------------------------------------- presence


async def test_welcome_then_presence_connected_and_disconnected_on_close(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """The agent is welcomed, presence connected is in the stream, then disconnected on close."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        assert welcome.agent_id == agent_id
        assert welcome.gateway_id == gateway.gateway_id
        event, headers = await wait_presence(
            nc, subjects, agent_id, event_type="presence.connected", conn_id=welcome.conn_id
        )
        assert isinstance(event, AgentConnected)
        assert event.boot_id == gateway.boot_id
        assert headers["Nats-Msg-Id"] == event.event_id
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.CLOSED
    assert event.close_code == 1000


async def test_presence_disconnected_after_abrupt_tcp_reset(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A connection reset (RST, no close frame) still publishes presence disconnected."""
    agent_id = new_id()
    ws = await connect(
        connect_url(gateway.port),
        additional_headers={
            "Authorization": f"Bearer {mint_agent_credential(agent_key[0], agent_id)}"
        },
    )
    welcome = await welcomed(ws)
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.close_code == 1006


# ---------------------------------------------------------------------- commands


async def test_command_is_forwarded_and_reply_is_stamped_with_credential_identity(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A request on agent.<id>.cmd reaches the agent; its answer returns as CommandReply."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        req = Terminal(req_id=new_id(), session_id=new_id(), channel_id="c1", command="uptime")
        request = asyncio.create_task(
            nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
        )
        forwarded = await recv_frame(ws)
        assert forwarded == req
        await send_frame(
            ws,
            TerminalStarted(
                req_id=req.req_id, session_id=req.session_id, channel_id="c1", pid=4242
            ),
        )
        result = decode_command_result((await request).data)
    assert isinstance(result, CommandReply)
    assert result.agent_id == agent_id
    assert result.conn_id == welcome.conn_id
    assert (result.gateway_id, result.boot_id) == (gateway.gateway_id, gateway.boot_id)
    assert isinstance(result.frame, TerminalStarted)
    assert result.frame.pid == 4242


async def test_non_request_command_gets_malformed_frame_failure(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """tunnel.data, a request without req_id and garbage get CommandFailed(malformed_frame)."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        payloads = [
            encode(TunnelData(session_id="s1", channel_id="c1", data=b"x")),
            encode(TunnelOpen(session_id="s1", tech_id="t1")),
            b"{not json",
        ]
        for payload in payloads:
            msg = await nc.request(subjects.agent_commands(agent_id), payload, timeout=TIMEOUT_S)
            result = decode_command_result(msg.data)
            assert isinstance(result, CommandFailed)
            assert result.code == ErrorCode.MALFORMED_FRAME


async def test_pending_request_fails_agent_offline_and_then_no_responders(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """An unanswered request fails with agent_offline when the socket ends; then no responders."""
    agent_id = new_id()
    req = TunnelOpen(req_id=new_id(), session_id=new_id(), tech_id="tech1")
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        request = asyncio.create_task(
            nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
        )
        assert await recv_frame(ws) == req
    result = decode_command_result((await request).data)
    assert isinstance(result, CommandFailed)
    assert result.code == ErrorCode.AGENT_OFFLINE
    await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)


# ---------------------------------------------------------------------- agent frames


async def test_bad_frames_get_error_frames_and_next_good_frame_works(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Malformed JSON, an unknown type and a binary frame get error frames; a heartbeat works."""
    agent_id = new_id()
    beats = await nc.subscribe(subjects.agent_events(agent_id, "heartbeat"))
    await nc.flush()  # the server knows the interest before anything is published
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        expected: list[tuple[str | bytes, ErrorCode]] = [
            ("{not json", ErrorCode.MALFORMED_FRAME),
            ('{"type": "bogus", "v": 1}', ErrorCode.UNKNOWN_TYPE),
            (b"\x00\x01binary", ErrorCode.MALFORMED_FRAME),
        ]
        for raw, code in expected:
            await ws.send(raw)
            frame = await recv_frame(ws)
            assert isinstance(frame, ErrorFrame)
            assert frame.code == code
        await send_frame(ws, heartbeat())
        msg = await beats.next_msg(timeout=TIMEOUT_S)
    beat = decode_agent_heartbeat(msg.data)
    assert (beat.agent_id, beat.conn_id) == (agent_id, welcome.conn_id)
    assert beat.gateway_id == gateway.gateway_id


async def test_too_many_consecutive_bad_frames_close_4003(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """max_consecutive_errors bad frames in a row close the socket with TOO_MANY_ERRORS."""
    gateway = await start_gateway(max_consecutive_errors=3)
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        await welcomed(ws)
        for _ in range(3):
            await ws.send("nope")
        assert await closed_code(ws) == CloseCode.TOO_MANY_ERRORS


async def test_oversize_frame_closes_1009(start_gateway: StartGateway, agent_key: Key) -> None:
    """A frame larger than max_frame_bytes closes the socket with 1009."""
    gateway = await start_gateway(max_frame_bytes=4096)
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        await welcomed(ws)
        await ws.send("x" * 10_000)
        assert await closed_code(ws) == CloseCode.MESSAGE_TOO_BIG


async def open_session(
    ws: ClientConnection, nc: NATS, subjects: Subjects, agent_id: str
) -> tuple[str, CommandReply]:
    """Drive tunnel.open -> tunnel.ready through the gateway; return the session id and reply."""
    session_id = new_id()
    req = TunnelOpen(req_id=new_id(), session_id=session_id, tech_id="tech1")
    request = asyncio.create_task(
        nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
    )
    assert await recv_frame(ws) == req
    await send_frame(ws, TunnelReady(req_id=req.req_id, session_id=session_id))
    result = decode_command_result((await request).data)
    assert isinstance(result, CommandReply)
    return session_id, result


async def test_session_frames_flow_up_with_seq_and_down_to_agent(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """tunnel.ready binds the session: data goes up with seq 0,1,2 and down to the agent."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        session_id, reply = await open_session(ws, nc, subjects, agent_id)
        assert isinstance(reply.frame, TunnelReady)
        up = await nc.subscribe(subjects.session_up(session_id))
        await nc.flush()  # the server knows the interest before anything is published
        for i in range(3):
            await send_frame(
                ws, TunnelData(session_id=session_id, channel_id="c1", data=f"out{i}".encode())
            )
        for i in range(3):
            frame = decode_session_up((await up.next_msg(timeout=TIMEOUT_S)).data)
            assert frame.seq == i
            assert frame.agent_id == agent_id
            assert isinstance(frame.frame, TunnelData)
            assert frame.frame.data == f"out{i}".encode()
        down = TunnelData(session_id=session_id, channel_id="c1", data=b"input")
        await nc.publish(subjects.session_down(session_id), encode(down))
        assert await recv_frame(ws) == down


async def test_frame_naming_foreign_session_gets_not_your_session_and_nothing_published(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects, subject_prefix: str
) -> None:
    """A frame for a session this connection does not hold is refused and never published."""
    agent_id = new_id()
    # every session subject of this test's namespace (the gateway never subscribes to this)
    every_session = await nc.subscribe(subjects.all_sessions())
    await nc.flush()  # the server knows the interest before anything is published
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        await send_frame(ws, TunnelData(session_id=new_id(), channel_id="c1", data=b"steal"))
        frame = await recv_frame(ws)
        assert isinstance(frame, ErrorFrame)
        assert frame.code == ErrorCode.NOT_YOUR_SESSION
        await send_frame(ws, TunnelData(session_id=session_id, channel_id="c1", data=b"mine"))
        # the first publication on any session subject is the held session's frame
        msg = await every_session.next_msg(timeout=TIMEOUT_S)
    assert msg.subject == subjects.session_up(session_id)
    assert decode_session_up(msg.data).seq == 0


async def test_down_subject_refuses_other_frame_types(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A tunnel.open on session.<id>.down is refused; the next tunnel.data is forwarded."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        bad = TunnelOpen(req_id=new_id(), session_id=session_id, tech_id="t")
        msg = await nc.request(subjects.session_down(session_id), encode(bad), timeout=TIMEOUT_S)
        result = decode_command_result(msg.data)
        assert isinstance(result, CommandFailed)
        good = TunnelData(session_id=session_id, channel_id="c1", data=b"ok")
        await nc.publish(subjects.session_down(session_id), encode(good))
        assert await recv_frame(ws) == good


# ---------------------------------------------------------------------- hub, revocation


async def test_second_connection_replaces_first_and_gets_requests(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A second connection of the same agent closes the first with 4000 and serves requests."""
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id)
    async with agent_socket(gateway.port, token) as first:
        first_welcome = await welcomed(first)
        async with agent_socket(gateway.port, token) as second:
            second_welcome = await welcomed(second)
            assert await closed_code(first) == CloseCode.REPLACED
            req = Terminal(req_id=new_id(), session_id=new_id(), channel_id="c", command="id")
            request = asyncio.create_task(
                nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
            )
            assert await recv_frame(second) == req
            await send_frame(
                second,
                TerminalStarted(req_id=req.req_id, session_id=req.session_id, channel_id="c"),
            )
            result = decode_command_result((await request).data)
            assert isinstance(result, CommandReply)
            assert result.conn_id == second_welcome.conn_id
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=first_welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.REPLACED


async def test_live_revocation_closes_4501_and_refuses_reconnect(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Writing the revocation key closes the live socket with 4501; the old credential gets 403."""
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id, iat=int(time.time()) - 60)
    kv = await nc.jetstream().key_value(subjects.revocation_bucket)
    async with agent_socket(gateway.port, token) as ws:
        welcome = await welcomed(ws)
        await kv.put(agent_id, datetime.now(UTC).isoformat().encode())
        assert await closed_code(ws) == CloseCode.REVOKED
    status, _ = await refused_status(gateway.port, {"Authorization": f"Bearer {token}"})
    assert status == 403
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.REVOKED
    assert event.close_code == CloseCode.REVOKED


# ---------------------------------------------------------------------- HTTP edge, lease


async def test_health_ready_and_unknown_path(gateway: Gateway) -> None:
    """/healthz and /readyz answer 200; an unknown path answers 404 with an error body."""
    assert await asyncio.to_thread(http_get, gateway.port, "/healthz") == (
        200,
        {"status": "alive"},
    )
    assert await asyncio.to_thread(http_get, gateway.port, "/readyz") == (
        200,
        {"status": "ready"},
    )
    status, body = await asyncio.to_thread(http_get, gateway.port, "/nope")
    assert status == 404
    assert body["error"]["code"] == ErrorCode.NOT_FOUND  # type: ignore[index]


async def test_readyz_is_503_while_draining(gateway: Gateway) -> None:
    """A draining gateway reports not ready and refuses upgrades with 503."""
    gateway.draining = True
    status, body = await asyncio.to_thread(http_get, gateway.port, "/readyz")
    assert status == 503
    assert body["error"]["code"] == ErrorCode.SERVICE_UNAVAILABLE  # type: ignore[index]


async def test_gateway_heartbeat_is_published_with_agent_count(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """The lease heartbeat carries gateway_id, boot_id, the TTL and the agent count."""
    beats = await nc.subscribe(subjects.gateway_heartbeat())
    await nc.flush()  # the server knows the interest before anything is published
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        await welcomed(ws)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            beat = decode_gateway_heartbeat(
                (await beats.next_msg(timeout=deadline - time.monotonic())).data
            )
            if beat.agents == 1:
                break
    assert (beat.gateway_id, beat.boot_id) == (gateway.gateway_id, gateway.boot_id)
    assert beat.lease_ttl_s == gateway.settings.lease_ttl_s
    assert beat.draining is False


async def test_stop_sends_reconnect_then_closes_4001(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Draining tells the agent to reconnect, closes with 4001 and publishes reason shutdown."""
    gateway = await start_gateway()
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        stopping = asyncio.create_task(gateway.stop())
        frame = await recv_frame(ws)
        assert frame.type == "reconnect"
        assert await closed_code(ws) == CloseCode.DRAINING
        await asyncio.wait_for(stopping, TIMEOUT_S)
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.SHUTDOWN


async def test_unanswered_pings_disconnect_with_reason_ping_timeout(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A half-open agent (upgraded, then silent: no pongs) is dropped as ping_timeout."""
    gateway = await start_gateway(ping_interval_s=0.2, ping_timeout_s=0.3, close_timeout_s=0.5)
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /agent/v1/connect HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    status_line = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
    assert b" 101 " in status_line
    try:
        event, _ = await wait_presence(
            nc, subjects, agent_id, event_type="presence.disconnected", timeout_s=8
        )
    finally:
        writer.close()
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.PING_TIMEOUT


async def test_tunnel_close_answered_by_closed_releases_the_session(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """After tunnel.close -> tunnel.closed the connection no longer holds the session."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        req = TunnelClose(req_id=new_id(), session_id=session_id)
        request = asyncio.create_task(
            nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
        )
        assert await recv_frame(ws) == req
        await send_frame(ws, TunnelClosed(req_id=req.req_id, session_id=session_id))
        result = decode_command_result((await request).data)
        assert isinstance(result, CommandReply)
        assert isinstance(result.frame, TunnelClosed)
        await send_frame(ws, TunnelData(session_id=session_id, channel_id="c1", data=b"late"))
        frame = await recv_frame(ws)
    assert isinstance(frame, ErrorFrame)
    assert frame.code == ErrorCode.NOT_YOUR_SESSION


async def test_heartbeat_claiming_foreign_session_is_published_without_it(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A heartbeat naming a session not held gets not_your_session; liveness is still published."""
    agent_id = new_id()
    beats = await nc.subscribe(subjects.agent_events(agent_id, "heartbeat"))
    await nc.flush()  # the server knows the interest before anything is published
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        await welcomed(ws)
        await send_frame(ws, heartbeat(mode="tunnel", session_id=new_id()))
        frame = await recv_frame(ws)
        msg = await beats.next_msg(timeout=TIMEOUT_S)
    assert isinstance(frame, ErrorFrame)
    assert frame.code == ErrorCode.NOT_YOUR_SESSION
    assert decode_agent_heartbeat(msg.data).session_id is None
