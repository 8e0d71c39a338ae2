"""One agent on two gateways (in-process, real NATS): the newer connection wins everywhere.

The order is the stream sequence of each connection's ``presence.connected``; the winner's
``control.takeover`` notice closes the older socket on the other gateway with 4000.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import nats.errors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS

from gurutunnel_protocol import CloseCode, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_command_result,
    decode_control,
    decode_presence,
    encode,
)
from gurutunnel_protocol.messages import (
    AgentDisconnected,
    CommandReply,
    ConnectionTakeover,
    DisconnectReason,
    Terminal,
    TerminalStarted,
)

from .agent_client import agent_socket, recv_frame, send_frame
from .conftest import StartGateway, wait_presence
from .credentials import mint_agent_credential
from .test_gateway import closed_code, welcomed

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0
TAKEOVER_BOUND_S = 2.0
"""How soon the older socket must be closed once the newer one was welcomed."""


async def connected_seq(
    nc: NATS, subjects: Subjects, agent_id: str, conn_id: str, timeout_s: float = TIMEOUT_S
) -> int:
    """Stream sequence of ``conn_id``'s presence.connected (read from the stream, bounded)."""
    sub = await nc.jetstream().subscribe(subjects.presence(agent_id), ordered_consumer=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no presence.connected of {conn_id} within {timeout_s}s"
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                continue
            event = decode_presence(msg.data)
            if event.type == "presence.connected" and event.conn_id == conn_id:
                seq: int = msg.metadata.sequence.stream
                return seq
    finally:
        await sub.unsubscribe()


async def test_second_gateway_wins_first_socket_closed_4000_and_only_second_answers(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Agent on A, then on B with A still open: A's socket closes 4000 within the bound, B
    announces the stream sequence of its presence event, and a request sent right after B's
    welcome (A possibly not yet told) is answered exactly once, by B."""
    gw_a, gw_b = await start_gateway(), await start_gateway()
    agent_id = new_id()
    token = mint_agent_credential(agent_key[0], agent_id)
    notices = await nc.subscribe(subjects.gateway_control())
    async with agent_socket(gw_a.port, token) as first:
        first_welcome = await welcomed(first)
        first_seq = await connected_seq(nc, subjects, agent_id, first_welcome.conn_id)
        async with agent_socket(gw_b.port, token) as second:
            second_welcome = await welcomed(second)
            welcomed_at = time.monotonic()
            replies = await nc.subscribe(nc.new_inbox())
            req = Terminal(req_id=new_id(), session_id=new_id(), channel_id="c1", command="id")
            await nc.publish(subjects.agent_commands(agent_id), encode(req), reply=replies.subject)
            assert await recv_frame(second) == req
            await send_frame(
                second,
                TerminalStarted(req_id=req.req_id, session_id=req.session_id, channel_id="c1"),
            )
            assert await closed_code(first) == CloseCode.REPLACED
            assert time.monotonic() - welcomed_at < TAKEOVER_BOUND_S

            result = decode_command_result((await replies.next_msg(timeout=TIMEOUT_S)).data)
            assert isinstance(result, CommandReply)
            assert (result.conn_id, result.gateway_id) == (second_welcome.conn_id, gw_b.gateway_id)
            event, _ = await wait_presence(
                nc,
                subjects,
                agent_id,
                event_type="presence.disconnected",
                conn_id=first_welcome.conn_id,
            )
            assert isinstance(event, AgentDisconnected)
            assert (event.reason, event.close_code) == (DisconnectReason.REPLACED, 4000)
            # A publishes any reply before its disconnect, and NATS delivers to this client in
            # that order: had A answered too, its reply would be queued here by now.
            assert replies.pending_msgs == 0

            second_seq = await connected_seq(nc, subjects, agent_id, second_welcome.conn_id)
            assert second_seq > first_seq
            announced: set[tuple[str, str, int]] = set()
            while len(announced) < 2:
                message = decode_control((await notices.next_msg(timeout=TIMEOUT_S)).data)
                assert isinstance(message, ConnectionTakeover)
                announced.add((message.conn_id, message.gateway_id, message.connected_seq))
            assert announced == {
                (first_welcome.conn_id, gw_a.gateway_id, first_seq),
                (second_welcome.conn_id, gw_b.gateway_id, second_seq),
            }


async def test_late_notice_of_an_older_connection_closes_nothing(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Reversed race: the older connection's notice arriving after the newer one is known is
    ignored; a newer notice (for a probe agent) sent right after it closes the probe 4000."""
    gw_a, gw_b = await start_gateway(), await start_gateway()
    agent_id, probe_id = new_id(), new_id()
    token = mint_agent_credential(agent_key[0], agent_id)
    async with agent_socket(gw_a.port, token) as first:
        first_welcome = await welcomed(first)
        first_seq = await connected_seq(nc, subjects, agent_id, first_welcome.conn_id)
        async with agent_socket(gw_b.port, token) as second:
            second_welcome = await welcomed(second)
            await connected_seq(nc, subjects, agent_id, second_welcome.conn_id)
            assert await closed_code(first) == CloseCode.REPLACED
            probe_token = mint_agent_credential(agent_key[0], probe_id)
            async with agent_socket(gw_b.port, probe_token) as probe:
                probe_welcome = await welcomed(probe)
                probe_seq = await connected_seq(nc, subjects, probe_id, probe_welcome.conn_id)
                late = ConnectionTakeover(
                    agent_id=agent_id,
                    gateway_id=gw_a.gateway_id,
                    boot_id=gw_a.boot_id,
                    conn_id=first_welcome.conn_id,
                    connected_seq=first_seq,
                    at=datetime.now(UTC),
                )
                newer = ConnectionTakeover(
                    agent_id=probe_id,
                    gateway_id="gw-elsewhere",
                    boot_id=new_id(),
                    conn_id=new_id(),
                    connected_seq=probe_seq + 1,
                    at=datetime.now(UTC),
                )
                await nc.publish(subjects.gateway_control(), encode(late))
                await nc.publish(subjects.gateway_control(), encode(newer))
                # one subscription handles notices in order: the late one was handled first
                assert await closed_code(probe) == CloseCode.REPLACED

            req = Terminal(req_id=new_id(), session_id=new_id(), channel_id="c2", command="id")
            pending = asyncio.create_task(
                nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
            )
            assert await recv_frame(second) == req
            await send_frame(
                second,
                TerminalStarted(req_id=req.req_id, session_id=req.session_id, channel_id="c2"),
            )
            result = decode_command_result((await pending).data)
            assert isinstance(result, CommandReply)
            assert result.conn_id == second_welcome.conn_id
