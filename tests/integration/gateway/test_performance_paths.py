"""The gateway's fast paths keep their contracts: spliced frames, handshake slots, compression,
shared subscription round trips (real NATS, in-process gateways, real WebSockets)."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect
from websockets.extensions.permessage_deflate import PerMessageDeflate

from gurutunnel_gateway.auth import AgentIdentity
from gurutunnel_gateway.bus import BusSubscription, MessageHandler, NatsBus
from gurutunnel_gateway.server import Gateway, _HandshakeSlot
from gurutunnel_protocol import ErrorCode, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_agent_to_server,
    decode_command_result,
    decode_session_up,
    encode,
)
from gurutunnel_protocol.messages import (
    CommandReply,
    ErrorFrame,
    TerminalChunk,
    TunnelOpen,
    TunnelReady,
    Welcome,
)

from .agent_client import agent_socket, connect_url, recv_frame
from .conftest import StartGateway
from .credentials import mint_agent_credential

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0


async def test_session_frame_published_is_the_frame_the_gateway_validated(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """The agent's JSON goes up as sent (extra field, duplicate key) and decodes as validated."""
    agent_id = new_id()
    session_id = new_id()
    # subscribed long before the frame: nats-py queues a SUB but writes a flush's PING at once,
    # so a flush right before the frame does not prove the server has the interest yet
    up = await nc.subscribe(subjects.session_up(session_id))
    await nc.flush()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        req = TunnelOpen(req_id=new_id(), session_id=session_id, tech_id="tech1")
        request = asyncio.create_task(
            nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
        )
        forwarded = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        assert forwarded == encode(req).decode()  # the API's bytes, not encoded again
        ready = {"type": "tunnel.ready", "req_id": req.req_id, "session_id": session_id}
        await ws.send(json.dumps({**ready, "newer": 1}))
        reply = decode_command_result((await request).data)
        assert isinstance(reply, CommandReply)
        assert reply.frame == TunnelReady(req_id=req.req_id, session_id=session_id)
        raw = (
            f'{{"type":"terminal.chunk","session_id":"{session_id}","channel_id":"c1","seq":0,'
            '"stream":"stderr","stream":"stdout","data":"b3V0","extra":{"x":[1,2]}}'
        )
        validated = decode_agent_to_server(raw)
        await ws.send(raw)
        msg = await up.next_msg(timeout=TIMEOUT_S)
    assert raw.encode() in msg.data
    published = decode_session_up(msg.data)
    assert published.frame == validated
    assert isinstance(published.frame, TerminalChunk)
    assert (published.frame.stream, published.frame.data) == ("stdout", b"out")
    assert (published.agent_id, published.session_id, published.seq) == (agent_id, session_id, 0)
    assert json.loads(msg.data)["gateway_id"] == gateway.gateway_id


async def test_agents_beyond_the_handshake_bound_all_get_welcomed(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """With two handshake slots, 20 agents connecting at once are all welcomed, never more than
    two set up at a time, and the slots come back."""
    gateway = await start_gateway(max_concurrent_handshakes=2)
    subscribe = gateway.bus.subscribe
    in_flight, most = 0, 0

    async def counting_subscribe(subject: str, handler: MessageHandler) -> BusSubscription:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.01)  # a slow NATS round trip: handshakes pile up
            return await subscribe(subject, handler)
        finally:
            in_flight -= 1

    gateway.bus.subscribe = counting_subscribe  # type: ignore[method-assign]

    async def one() -> None:
        credential = mint_agent_credential(agent_key[0], new_id())
        async with agent_socket(gateway.port, credential) as ws:
            assert isinstance(await recv_frame(ws), Welcome)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 4 * TIMEOUT_S)
    for _ in range(100):  # the last slot is released once presence.connected is acknowledged
        if not gateway._handshakes.locked():
            break
        await asyncio.sleep(0.05)
    assert not gateway._handshakes.locked()
    assert most == 2


async def test_refused_credentials_do_not_keep_handshake_slots(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """Refused upgrades give their slot back: a valid agent still gets in with one slot."""
    gateway = await start_gateway(max_concurrent_handshakes=1)
    for _ in range(3):
        with pytest.raises(Exception, match="401"):
            async with agent_socket(gateway.port, "not-a-credential"):
                pass
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        assert isinstance(await recv_frame(ws), Welcome)


async def test_handshake_slot_of_a_vanished_client_is_released_by_the_open_timeout(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """A slot taken by an upgrade that never reaches the handler comes back after the timeout."""
    gateway = await start_gateway(max_concurrent_handshakes=1)
    slot = _HandshakeSlot(gateway._handshakes)
    await slot.acquire(0.2)  # as an upgrade that then vanished before the handler
    assert gateway._handshakes.locked()
    await asyncio.sleep(0.4)
    assert not gateway._handshakes.locked()
    slot.release()  # idempotent: the timer released it already
    assert not gateway._handshakes.locked()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        assert isinstance(await recv_frame(ws), Welcome)


@pytest.mark.parametrize(("setting", "negotiated"), [("none", False), ("deflate", True)])
async def test_compression_setting_decides_permessage_deflate(
    start_gateway: StartGateway, agent_key: Key, setting: str, negotiated: bool
) -> None:
    """An agent offering permessage-deflate gets it only with compression=deflate."""
    gateway = await start_gateway(compression=setting)
    credential = mint_agent_credential(agent_key[0], new_id())
    async with connect(
        connect_url(gateway.port),
        additional_headers={"Authorization": f"Bearer {credential}"},
        open_timeout=TIMEOUT_S,
    ) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        extensions = ws.protocol.extensions
    assert any(isinstance(e, PerMessageDeflate) for e in extensions) is negotiated


def test_compression_is_off_by_default() -> None:
    """The default settings decline permessage-deflate."""
    from gurutunnel_gateway.config import GatewaySettings

    assert GatewaySettings(agent_public_key="x").compression == "none"


async def test_concurrent_subscriptions_each_receive_a_message_published_right_after(
    gateway: Gateway, nc: NATS, subjects: Subjects
) -> None:
    """Subscriptions sharing one flush round trip are all known to the server when they return."""
    bus: NatsBus = gateway.bus
    received: dict[str, asyncio.Future[bytes]] = {}

    async def subscribe_then_publish(i: int) -> None:
        subject = f"{subjects.prefix}.test.shared.{i}"
        loop = asyncio.get_running_loop()
        received[subject] = loop.create_future()

        async def handler(payload: bytes, reply: str | None) -> None:
            if not received[subject].done():
                received[subject].set_result(payload)

        await bus.subscribe(subject, handler)
        await nc.publish(subject, b"hello")  # another client, right after subscribe returned
        await nc.flush()

    await asyncio.gather(*(subscribe_then_publish(i) for i in range(200)))
    payloads = await asyncio.wait_for(asyncio.gather(*received.values()), TIMEOUT_S)
    assert payloads == [b"hello"] * 200


async def test_upgrade_refused_after_the_credential_check_gives_its_slot_back_at_once(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """A credentialed request that websockets itself refuses (no Sec-WebSocket-Key: 400) frees
    its slot at once, not after open_timeout: such requests cannot starve other agents."""
    gateway = await start_gateway(max_concurrent_handshakes=1, open_timeout_s=30.0)
    credential = mint_agent_credential(agent_key[0], new_id())
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(
            (
                "GET /agent/v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {credential}\r\n\r\n"
            ).encode()
        )
        status = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        writer.close()
        assert b" 400 " in status, status
    assert not gateway._handshakes.locked()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        assert isinstance(await asyncio.wait_for(recv_frame(ws), TIMEOUT_S), Welcome)


async def test_agent_gone_while_in_line_does_not_keep_the_slot_it_is_then_given(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """An agent that gives up while waiting for a handshake slot gets nothing when its turn
    comes, and the slot comes back at once, not open_timeout_s later: in a storm, agents that
    time out in line would otherwise hold every slot that long and stop all admissions."""
    gateway = await start_gateway(max_concurrent_handshakes=1, open_timeout_s=30.0)
    await gateway._handshakes.acquire()  # an upgrade in progress holds the one slot
    credential = mint_agent_credential(agent_key[0], new_id())
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            (
                "GET /agent/v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Authorization: Bearer {credential}\r\n\r\n"
            ).encode()
        )
        async with asyncio.timeout(TIMEOUT_S):
            # in line for the slot (asyncio.Semaphore's waiters: no public count exists)
            while not gateway._handshakes._waiters:
                await asyncio.sleep(0.01)
        writer.write_eof()  # the agent gives up
        # the gateway saw it go (it ends its side) while the upgrade is still in line
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
    finally:
        writer.close()
    gateway._handshakes.release()  # the gone upgrade's turn
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        assert isinstance(await asyncio.wait_for(recv_frame(ws), TIMEOUT_S), Welcome)


async def test_an_idle_agent_holds_no_send_queue_no_task_of_its_own_and_no_credential(
    gateway: Gateway, agent_key: Key
) -> None:
    """Once welcomed and announced, an idle connection keeps no send queue, writer, announce
    task or bus delivery task (memory per idle agent), and the request websockets keeps no
    longer carries the credential; the next frame still gets through."""
    agent_id = new_id()
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        conn = gateway.hub.current(agent_id)
        assert conn is not None
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while conn._announcing is not None or conn._writer is not None:
            assert asyncio.get_running_loop().time() < deadline, "set-up did not end in time"
            await asyncio.sleep(0.01)
        assert conn.connected_seq is not None
        assert conn._queue is None
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "nats-dispatch"]
        assert conn.ws.request is not None
        assert "Authorization" not in conn.ws.request.headers
        probe = ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="probe")
        assert conn.send(probe)  # a queue and a writer come back for it
        assert await recv_frame(ws) == probe


async def test_the_credential_check_waits_in_line_for_a_handshake_slot(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """An upgrade is checked only once it holds a slot: while the one slot is taken, an agent's
    request waits unchecked (a storm's signature checks never pile into one loop turn); once
    the slot comes back it is checked, once, and welcomed."""
    gateway = await start_gateway(max_concurrent_handshakes=1, open_timeout_s=30.0)
    verify = gateway.verifier.verify
    checked: list[str] = []

    def counting_verify(token: str) -> AgentIdentity:
        checked.append(token)
        return verify(token)

    gateway.verifier.verify = counting_verify  # type: ignore[method-assign]
    await gateway._handshakes.acquire()  # an upgrade in progress holds the one slot

    async def welcomed() -> None:
        credential = mint_agent_credential(agent_key[0], new_id())
        async with agent_socket(gateway.port, credential) as ws:
            assert isinstance(await recv_frame(ws), Welcome)

    agent = asyncio.create_task(welcomed())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            # in line for the slot (asyncio.Semaphore's waiters: no public count exists)
            while not gateway._handshakes._waiters:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert checked == []
        gateway._handshakes.release()
        await asyncio.wait_for(agent, TIMEOUT_S)
    finally:
        agent.cancel()
    assert len(checked) == 1


async def test_every_reply_of_a_connection_carries_its_stamp_and_its_own_answer(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Replies share one head per connection: each still decodes to this connection's stamp
    around the answer the agent sent for that request, and another connection has its own."""
    for _ in range(2):  # two connections in turn: the head is not shared between them
        agent_id = new_id()
        async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
            welcome = await recv_frame(ws)
            assert isinstance(welcome, Welcome)
            for _ in range(3):
                req = TunnelOpen(req_id=new_id(), session_id=new_id(), tech_id="tech1")
                request = asyncio.create_task(
                    nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
                )
                assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))["req_id"] == (
                    req.req_id
                )
                ready = TunnelReady(req_id=req.req_id, session_id=req.session_id)
                await ws.send(encode(ready).decode())
                reply = decode_command_result((await request).data)
                assert isinstance(reply, CommandReply)
                assert reply.frame == TunnelReady(req_id=req.req_id, session_id=req.session_id)
                assert (reply.agent_id, reply.conn_id, reply.gateway_id) == (
                    agent_id,
                    welcome.conn_id,
                    gateway.gateway_id,
                )
                assert reply.boot_id == gateway.boot_id
