"""``GET /metrics`` of the gateway: real NATS, real agent sockets, parsed as Prometheus text."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gurutunnel_gateway.metrics import GatewayMetrics
from gurutunnel_gateway.server import Gateway
from gurutunnel_protocol import Subjects, new_id
from gurutunnel_protocol.envelope import decode_command_result, encode
from gurutunnel_protocol.messages import CommandReply, Terminal, TerminalStarted, TunnelData
from tests.support.services import NatsProcess

from .agent_client import agent_socket, connect_url, heartbeat, recv_frame, send_frame
from .conftest import StartGateway, gateway_settings
from .credentials import mint_agent_credential
from .test_gateway import open_session, welcomed

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as r:
        assert r.status == 200
        return r.read().decode(), r.headers["Content-Type"]


async def scrape(port: int) -> tuple[str, Samples]:
    """The raw exposition and its samples by (name, labels); parsing fails on a bad format."""
    text, content_type = await asyncio.to_thread(_get, port)
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``check`` holds (bounded)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        _, samples = await scrape(port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never showed {what} within {TIMEOUT_S}s: {samples}")
        await asyncio.sleep(0.05)


async def test_metrics_count_a_connected_agent_its_traffic_and_zero_after_it_left(
    gateway: Gateway, agent_key: Key, nc: NATS, subjects: Subjects
) -> None:
    """1 agent and frames/bytes both ways while connected, pending requests while one waits,
    0 agents and one close (code 1000) after; no agent, connection or session id in the text."""
    agent_id = new_id()
    _, before = await scrape(gateway.port)
    assert value(before, "gurutunnel_gateway_agents_connected") == 0
    assert value(before, "gurutunnel_gateway_frames_total", direction="in") == 0
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], agent_id)) as ws:
        welcome = await welcomed(ws)
        await send_frame(ws, heartbeat())
        session_id, _ = await open_session(ws, nc, subjects, agent_id)
        await send_frame(ws, TunnelData(session_id=session_id, channel_id="c1", data=b"x" * 500))
        # a request the agent has not answered yet is pending
        req_id = new_id()
        req = Terminal(req_id=req_id, session_id=session_id, channel_id="c2", command="true")
        request = asyncio.create_task(
            nc.request(subjects.agent_commands(agent_id), encode(req), timeout=TIMEOUT_S)
        )
        assert await recv_frame(ws) == req
        text, during = await scrape(gateway.port)
        assert value(during, "gurutunnel_gateway_agents_connected") == 1
        assert value(during, "gurutunnel_gateway_pending_requests") == 1
        await send_frame(
            ws, TerminalStarted(req_id=req_id, session_id=session_id, channel_id="c2", pid=1)
        )
        assert isinstance(decode_command_result((await request).data), CommandReply)

    # the welcome, tunnel.open and terminal.command went out; heartbeat, ready, data came in
    assert value(during, "gurutunnel_gateway_frames_total", direction="out") >= 3
    assert value(during, "gurutunnel_gateway_frames_total", direction="in") >= 3
    assert value(during, "gurutunnel_gateway_frame_bytes_total", direction="in") > 500
    assert value(during, "gurutunnel_gateway_frame_bytes_total", direction="out") > 0
    assert (
        value(during, "gurutunnel_gateway_agent_upgrades_total", outcome="accepted", status="101")
        == 1
    )
    conn_id = welcome.conn_id
    assert conn_id is not None
    for secret in (agent_id, conn_id, session_id, req_id):
        assert secret not in text

    after = await eventually(
        gateway.port,
        lambda s: (
            value(s, "gurutunnel_gateway_agents_connected") == 0
            and value(
                s, "gurutunnel_gateway_connections_closed_total", code="1000", reason="closed"
            )
            == 1
        ),
        "the agent gone",
    )
    assert value(after, "gurutunnel_gateway_pending_requests") == 0
    assert value(after, "gurutunnel_gateway_frames_total", direction="in") >= value(
        during, "gurutunnel_gateway_frames_total", direction="in"
    )
    assert value(after, "gurutunnel_gateway_lease_losses_total") == 0
    assert value(after, "gurutunnel_gateway_nats_reconnects_total") == 0


async def test_refused_upgrades_are_counted_by_status(gateway: Gateway, agent_key: Key) -> None:
    """A bad credential counts as refused 401; a draining gateway's refusal as refused 503."""
    with pytest.raises(InvalidStatus):
        async with connect(
            connect_url(gateway.port),
            additional_headers={"Authorization": "Bearer not-a-token"},
            open_timeout=TIMEOUT_S,
        ):
            pass
    gateway.draining = True
    try:
        with pytest.raises(InvalidStatus):
            async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())):
                pass
        _, samples = await scrape(gateway.port)
    finally:
        gateway.draining = False
    upgrades = "gurutunnel_gateway_agent_upgrades_total"
    assert value(samples, upgrades, outcome="refused", status="401") == 1
    assert value(samples, upgrades, outcome="refused", status="503") == 1
    assert value(samples, upgrades, outcome="accepted", status="101") == 0


async def test_two_gateways_in_one_process_keep_their_own_metrics(
    start_gateway: StartGateway, agent_key: Key
) -> None:
    """Each gateway has its own registry: an agent on the first shows only in the first."""
    first = await start_gateway()
    second = await start_gateway()
    GatewayMetrics()  # yet another registry in this process: no duplicate registration
    async with agent_socket(first.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        await welcomed(ws)
        _, one = await scrape(first.port)
        _, two = await scrape(second.port)
    assert value(one, "gurutunnel_gateway_agents_connected") == 1
    assert value(two, "gurutunnel_gateway_agents_connected") == 0
    assert value(one, "gurutunnel_gateway_frames_total", direction="out") >= 1
    assert value(two, "gurutunnel_gateway_frames_total", direction="out") == 0


async def test_nats_reconnect_is_counted_once_the_server_is_back(
    subject_prefix: str, agent_key: Key
) -> None:
    """A NATS restart under a running gateway shows as one reconnect."""
    server = NatsProcess()
    server.start()
    try:
        gateway = Gateway(
            gateway_settings(server.url, subject_prefix, agent_key[1], nats_reconnect_wait_s=0.1)
        )
        await gateway.start()
        try:
            server.stop()
            server.start()  # same port and JetStream directory
            await eventually(
                gateway.port,
                lambda s: value(s, "gurutunnel_gateway_nats_reconnects_total") == 1,
                "one NATS reconnect",
            )
        finally:
            await gateway.stop()
    finally:
        server.cleanup()


async def test_a_lost_lease_is_counted_with_the_sockets_it_closed(
    gateway: Gateway, agent_key: Key
) -> None:
    """When the gateway fences itself (lease ran out), lease_losses_total goes to 1 and the
    agent's socket shows as closed 4002 lease_lost."""
    async with agent_socket(gateway.port, mint_agent_credential(agent_key[0], new_id())) as ws:
        await welcomed(ws)
        assert gateway.check_lease(time.monotonic() + 3600)
        samples = await eventually(
            gateway.port,
            lambda s: (
                value(
                    s,
                    "gurutunnel_gateway_connections_closed_total",
                    code="4002",
                    reason="lease_lost",
                )
                == 1
            ),
            "the socket closed lease_lost",
        )
    assert value(samples, "gurutunnel_gateway_lease_losses_total") == 1


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_metrics_port_serves_metrics_and_probes_and_the_agent_port_hides_metrics(
    start_gateway: StartGateway,
) -> None:
    """With ``metrics_port`` set, /metrics, /healthz and /readyz answer there (any other path
    404, no upgrade), and the public agent port answers /metrics 404 but keeps its probes."""
    gateway = await start_gateway(metrics_port=0)
    ops = gateway.metrics_port
    assert ops is not None and ops != gateway.port
    _, samples = await scrape(ops)
    assert value(samples, "gurutunnel_gateway_agents_connected") == 0.0
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/agent/v1/connect", 404)):
        assert await asyncio.to_thread(_status, ops, path) == status, path
    assert await asyncio.to_thread(_status, gateway.port, "/metrics") == 404
    assert await asyncio.to_thread(_status, gateway.port, "/readyz") == 200
