"""Gateway self-fencing (close path 2): a gateway whose lease ran out drops its agent sockets
with 4002 and takes a new boot id before it beats again; ``stop`` never hangs on NATS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from urllib.error import HTTPError

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gurutunnel_gateway.server import Gateway
from gurutunnel_protocol import CloseCode, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_gateway_heartbeat,
    decode_server_to_agent,
    encode,
)
from gurutunnel_protocol.messages import (
    AgentConnected,
    AgentDisconnected,
    DisconnectReason,
    GatewayLeaseLost,
    Reconnect,
    ServerToAgent,
    Welcome,
)
from tests.support.services import NatsProcess

from .agent_client import agent_socket, recv_frame
from .conftest import StartGateway, gateway_settings, wait_presence
from .credentials import mint_agent_credential

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0


async def until_closed(
    ws: ClientConnection, timeout_s: float = TIMEOUT_S
) -> tuple[list[ServerToAgent], int | None]:
    """Read until the gateway closes the socket: the frames seen and the close code it sent."""
    frames: list[ServerToAgent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            raw = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
            frames.append(decode_server_to_agent(raw))
    except ConnectionClosed as exc:
        return frames, exc.rcvd.code if exc.rcvd else None


async def next_beat_of(sub: Subscription, boot_id: str) -> None:
    """Wait (bounded) for a lease heartbeat of ``boot_id``."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no heartbeat of boot {boot_id} within {TIMEOUT_S}s")
        try:
            msg = await sub.next_msg(timeout=remaining)
        except nats.errors.TimeoutError:
            continue
        if decode_gateway_heartbeat(msg.data).boot_id == boot_id:
            return


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except HTTPError as exc:
        return exc.code


async def wait_readyz(port: int, status: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (got := await asyncio.to_thread(readyz, port)) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {got}, wanted {status}")
        await asyncio.sleep(0.05)


async def test_lease_run_out_closes_agent_sockets_4002_and_takes_a_new_boot(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """Driven with a monotonic time past the lease: the agent gets a reconnect hint and close
    4002, its disconnect says lease_lost under the old boot; the gateway beats again as a new
    boot, and a new connection is stamped with it."""
    gateway = await start_gateway(lease_ttl_s=6.0)
    beats = await nc.subscribe(subjects.gateway_heartbeat())
    agent_id = new_id()
    credential = mint_agent_credential(agent_key[0], agent_id)
    old_boot = gateway.boot_id
    async with agent_socket(gateway.port, credential) as ws:
        welcome = await recv_frame(ws)
        assert isinstance(welcome, Welcome)
        assert gateway.check_lease(time.monotonic()) is False  # a live lease: nothing happens
        assert gateway.check_lease(time.monotonic() + gateway.settings.lease_ttl_s + 1) is True
        frames, code = await until_closed(ws)
    assert code == CloseCode.LEASE_LOST
    assert [type(f) for f in frames] == [Reconnect]
    assert gateway.boot_id != old_boot
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert (event.reason, event.close_code, event.boot_id) == (
        DisconnectReason.LEASE_LOST,
        CloseCode.LEASE_LOST,
        old_boot,
    )

    await next_beat_of(beats, gateway.boot_id)
    await wait_readyz(gateway.port, 200)
    async with agent_socket(gateway.port, credential) as ws:
        again = await recv_frame(ws)
        assert isinstance(again, Welcome)
        event, _ = await wait_presence(
            nc, subjects, agent_id, event_type="presence.connected", conn_id=again.conn_id
        )
        assert isinstance(event, AgentConnected) and event.boot_id == gateway.boot_id
    await beats.unsubscribe()


async def test_lease_lost_notice_for_its_boot_fences_the_gateway_and_others_are_ignored(
    start_gateway: StartGateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """A ``GatewayLeaseLost`` naming another gateway or an older boot changes nothing; one
    naming this gateway's current boot closes the agent 4002 and the new boot beats at once."""
    gateway = await start_gateway(lease_ttl_s=30.0, heartbeat_interval_s=10.0)
    beats = await nc.subscribe(subjects.gateway_heartbeat())
    credential = mint_agent_credential(agent_key[0], new_id())
    boot = gateway.boot_id
    async with agent_socket(gateway.port, credential) as ws:
        assert isinstance(await recv_frame(ws), Welcome)
        for gateway_id, boot_id in ((new_id(), boot), (gateway.gateway_id, new_id())):
            notice = GatewayLeaseLost(gateway_id=gateway_id, boot_id=boot_id)
            await nc.publish(subjects.gateway_control(), encode(notice))
        await nc.flush()
        await asyncio.sleep(0.3)  # the notices are handled in order with the next one
        assert gateway.boot_id == boot
        ordered = time.monotonic()
        own = GatewayLeaseLost(gateway_id=gateway.gateway_id, boot_id=boot)
        await nc.publish(subjects.gateway_control(), encode(own))
        frames, code = await until_closed(ws)
    assert code == CloseCode.LEASE_LOST
    assert [type(f) for f in frames] == [Reconnect]
    assert gateway.boot_id != boot
    # far sooner than the 10 s heartbeat interval: the new boot beats at once
    await next_beat_of(beats, gateway.boot_id)
    assert time.monotonic() - ordered < 5.0
    await wait_readyz(gateway.port, 200)
    await beats.unsubscribe()


@pytest.fixture
def own_nats() -> Iterator[NatsProcess]:
    """A NATS server of this test alone (it gets paused); resumed and stopped at teardown."""
    server = NatsProcess()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.cleanup()


@contextlib.contextmanager
def paused(server: NatsProcess) -> Iterator[None]:
    """SIGSTOP the server: sockets stay open, nothing is answered (a partition)."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@pytest.fixture
async def own_nc(own_nats: NatsProcess) -> AsyncIterator[NATS]:
    client = await nats.connect(own_nats.url, connect_timeout=5)
    yield client
    await client.close()


async def test_unconfirmed_heartbeats_fence_the_gateway_within_its_ttl(
    own_nats: NatsProcess, own_nc: NATS, subject_prefix: str, agent_key: Key
) -> None:
    """NATS stops answering: no heartbeat is confirmed, so within the TTL (plus a bounded
    beat) the gateway closes its agent sockets 4002, refuses upgrades and takes a new boot;
    once NATS answers again the new boot beats and the gateway is ready again."""
    ttl_s = 1.0
    settings = gateway_settings(
        own_nats.url,
        subject_prefix,
        agent_key[1],
        lease_ttl_s=ttl_s,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=0.2,
        presence_attempts=1,
    )
    gateway = Gateway(settings)
    await gateway.start()
    try:
        beats = await own_nc.subscribe(Subjects(subject_prefix).gateway_heartbeat())
        old_boot = gateway.boot_id
        credential = mint_agent_credential(agent_key[0], new_id())
        async with agent_socket(gateway.port, credential) as ws:
            assert isinstance(await recv_frame(ws), Welcome)
            with paused(own_nats):
                stopped = time.monotonic()
                _, code = await until_closed(ws, timeout_s=ttl_s + 2 * 0.2 + 1.0)
                assert time.monotonic() - stopped <= ttl_s + 2 * 0.2 + 1.0
                assert code == CloseCode.LEASE_LOST
                assert gateway.boot_id != old_boot
                assert not gateway.ready
                assert await asyncio.to_thread(readyz, gateway.port) == 503
        await next_beat_of(beats, gateway.boot_id)
        await wait_readyz(gateway.port, 200)
        await beats.unsubscribe()
    finally:
        await gateway.stop()


async def test_stop_returns_in_bounded_time_while_nats_does_not_answer(
    own_nats: NatsProcess, subject_prefix: str, agent_key: Key
) -> None:
    """With NATS paused, stop's last heartbeat, the loops and the bus close are each bounded:
    stop returns instead of hanging on a flush."""
    settings = gateway_settings(
        own_nats.url,
        subject_prefix,
        agent_key[1],
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=0.5,
        publish_timeout_s=1.0,
        close_timeout_s=1.0,
    )
    gateway = Gateway(settings)
    await gateway.start()
    with paused(own_nats):
        started = time.monotonic()
        # the bound: loops' cancel + last beat + bus close, each bounded, plus slack
        bound_s = settings.close_timeout_s + settings.heartbeat_timeout_s
        bound_s += settings.publish_timeout_s + settings.close_timeout_s + 2.0
        await asyncio.wait_for(gateway.stop(), bound_s)
        assert time.monotonic() - started <= bound_s
